package apikey

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime/debug"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/keystile/caddy-apikey/internal/ratelimit"
	"github.com/keystile/caddy-apikey/internal/regularfile"
	"github.com/keystile/caddy-apikey/internal/testutil"
)

// Digests for keys files; hashN is "sha256:" and 64 hex digits.
var (
	hash1 = sha256Hex("key-one")
	hash2 = sha256Hex("key-two")
	hash3 = sha256Hex("key-three")
	hash4 = sha256Hex("key-four")
	hash5 = sha256Hex("key-five")
	hash6 = sha256Hex("key-six")
	hash7 = sha256Hex("key-seven")
)

func digestOf(t *testing.T, s string) [32]byte {
	t.Helper()
	var d [32]byte
	b, err := hex.DecodeString(strings.TrimPrefix(s, "sha256:"))
	if err != nil || len(b) != 32 {
		t.Fatalf("bad digest %q in test", s)
	}
	copy(d[:], b)
	return d
}

// wantRecord is what a test expects of a keyRecord.
type wantRecord struct {
	id, name, owner string
	hash            string
	metadata        map[string]string
	limitMode       limitMode
	limit           ratelimit.Limit
	policy          string
	burst           int64
}

func TestParseKeysFile(t *testing.T) {
	tests := []struct {
		name string
		data string
		want []wantRecord
	}{
		{
			name: "empty keys array",
			data: `{"keys": []}`,
			want: nil,
		},
		{
			name: "surrounding whitespace",
			data: "\n\t {\"keys\": [{\"id\": \"a\", \"hash\": \"" + hash1 + "\"}]}\n\n",
			want: []wantRecord{{id: "a", hash: hash1}},
		},
		{
			name: "every field",
			data: `{"keys": [
				{"id": "plain", "hash": "` + hash1 + `"},
				{"id": "full", "hash": "sha256:` + strings.ToUpper(hash2[len("sha256:"):]) + `", "name": "Full Key", "owner": "team-a",
				 "metadata": {"plan": "pro", "region.eu-1_x": "yes"}, "rate": "10/1s", "burst": 5},
				{"id": "own", "hash": "` + hash3 + `", "rate": "600/1m"},
				{"id": "days", "hash": "` + hash4 + `", "rate": "5000/d"},
				{"id": "off", "hash": "` + hash5 + `", "rate": "off"},
				{"id": "burst-only", "hash": "` + hash6 + `", "burst": 3},
				{"id": "empty-meta~!#$%&'()*+,-./:;<=>?@[]^_` + "`" + `{|}", "hash": "` + hash7 + `", "metadata": {}}
			]}`,
			want: []wantRecord{
				{id: "plain", hash: hash1},
				{
					id: "full", name: "Full Key", owner: "team-a", hash: hash2,
					metadata:  map[string]string{"plan": "pro", "region.eu-1_x": "yes"},
					limitMode: limitOwn,
					limit:     ratelimit.Limit{Count: 10, Period: time.Second, Burst: 5},
					policy:    `"key";q=10;w=1`,
				},
				{
					id: "own", hash: hash3,
					limitMode: limitOwn,
					limit:     ratelimit.Limit{Count: 600, Period: time.Minute, Burst: 600},
					policy:    `"key";q=600;w=60`,
				},
				{
					id: "days", hash: hash4,
					limitMode: limitOwn,
					limit:     ratelimit.Limit{Count: 5000, Period: 24 * time.Hour, Burst: 5000},
					policy:    `"key";q=5000;w=86400`,
				},
				{id: "off", hash: hash5, limitMode: limitOff},
				{id: "burst-only", hash: hash6, limitMode: limitInherit, burst: 3},
				{id: "empty-meta~!#$%&'()*+,-./:;<=>?@[]^_`{|}", hash: hash7},
			},
		},
		{
			name: "longest id",
			data: `{"keys": [{"id": "` + strings.Repeat("i", 128) + `", "hash": "` + hash1 + `"}]}`,
			want: []wantRecord{{id: strings.Repeat("i", 128), hash: hash1}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := parseKeysFile([]byte(tt.data))
			if err != nil {
				t.Fatalf("parseKeysFile: %v", err)
			}
			if set.len() != len(tt.want) {
				t.Errorf("got %d keys, want %d", set.len(), len(tt.want))
			}
			for _, w := range tt.want {
				d := digestOf(t, w.hash)
				rec := set.get(&d)
				if rec == nil {
					t.Errorf("key %q not found by its digest", w.id)
					continue
				}
				assertRecord(t, rec, w)
			}
		})
	}
}

func assertRecord(t *testing.T, rec *keyRecord, w wantRecord) {
	t.Helper()
	got := wantRecord{
		id: rec.id, name: rec.name, owner: rec.owner, hash: "sha256:" + hex.EncodeToString(rec.digest[:]),
		metadata: rec.metadata, limitMode: rec.limitMode, limit: rec.limit, policy: rec.policy.header, burst: rec.burst,
	}
	if !reflect.DeepEqual(got, w) {
		t.Errorf("record = %+v\nwant     %+v", got, w)
	}
	// What the request path needs is made at load.
	if rec.idAny != rec.id || rec.provider == nil {
		t.Errorf("record %q is not finished: idAny %v, provider set %v", rec.id, rec.idAny, rec.provider != nil)
	}
	if v, ok := rec.provider("http.api_key.id"); !ok || v != rec.id {
		t.Errorf("placeholder http.api_key.id = %v, %v; want %q", v, ok, rec.id)
	}
}

func TestParseKeysFileErrors(t *testing.T) {
	entryA := `{"id": "a", "hash": "` + hash1 + `"}`
	tests := []struct {
		name string
		data string
		want string // the exact message, or
		// match, a regular expression for the whole message.
		match string
	}{
		{name: "empty file", data: "", want: `file is empty; want {"keys": [...]}`},
		{name: "whitespace only", data: " \n\t\r\n", want: `file is empty; want {"keys": [...]}`},
		{
			name: "not JSON",
			data: "nope",
			want: "invalid JSON at line 1, column 2: invalid character 'o' in literal null (expecting 'u')",
		},
		{
			// The offending "}" is on line 3, column 97.
			name: "bad JSON inside an entry",
			data: "{\"keys\": [\n  " + entryA + ",\n  {\"id\": \"b\", \"hash\": \"" + hash2 + "\",}\n]}",
			want: "keys[1]: invalid JSON at line 3, column 97: invalid character '}' looking for beginning of object key string",
		},
		{
			// The second entry starts at line 3, column 3, without a comma
			// before it.
			name: "missing comma between entries",
			data: "{\"keys\": [\n  " + entryA + "\n  " + entryA + "\n]}",
			want: "keys[1]: invalid JSON at line 3, column 3: invalid character '{' after array element",
		},
		{
			// The "x" is at line 2, column 2.
			name: "bad JSON after the keys array",
			data: "{\"keys\": []\n x}",
			want: "invalid JSON at line 2, column 2: invalid character 'x' after object key:value pair",
		},
		{name: "truncated in an entry", data: `{"keys": [{"id": "a", "ha`, want: "keys[0]: unexpected end of file (truncated JSON?)"},
		{name: "truncated after an entry", data: `{"keys": [` + entryA, want: "unexpected end of file (truncated JSON?)"},
		{name: "truncated after the array", data: `{"keys": [` + entryA + `]`, want: "unexpected end of file (truncated JSON?)"},
		{name: "truncated after the brace", data: `{`, want: "unexpected end of file (truncated JSON?)"},
		{name: "top level is an array", data: `[` + entryA + `]`, want: `expected a JSON object {"keys": [...]}, found [`},
		{name: "top level is a string", data: `"keys"`, want: `expected a JSON object {"keys": [...]}, found "keys"`},
		{name: "top level is null", data: `null`, want: `expected a JSON object {"keys": [...]}, found <nil>`},
		{name: "keys is an object", data: `{"keys": {}}`, want: `expected an array after "keys", found {`},
		{name: "keys is null", data: `{"keys": null}`, want: `expected an array after "keys", found <nil>`},
		{name: "no keys field", data: `{}`, want: `no "keys" array; want {"keys": [...]}`},
		{name: "unknown top-level field", data: `{"key": []}`, want: `unknown top-level field "key"; want {"keys": [...]}`},
		{name: "unknown field after keys", data: `{"keys": [], "version": 2}`, want: `unknown top-level field "version"; want {"keys": [...]}`},
		{name: "keys twice", data: `{"keys": [], "keys": []}`, want: `"keys" appears twice`},
		{
			name: "unknown entry field",
			data: `{"keys": [` + entryA + `, {"id": "b", "hash": "` + hash2 + `", "rat": "10/1m"}]}`,
			want: `keys[1] (id "b"): json: unknown field "rat"`,
		},
		{
			name:  "burst as a string",
			data:  "{\"keys\": [\n  " + entryA + ",\n  {\"id\": \"b\",\n   \"hash\": \"" + hash2 + "\",\n   \"burst\": \"5\"}\n]}",
			match: `^keys\[1\] \(id "b"\): line 5, column \d+: "burst" must be a whole number, not a JSON string$`,
		},
		{
			name:  "metadata value not a string",
			data:  `{"keys": [{"id": "a", "hash": "` + hash1 + `", "metadata": {"plan": 3}}]}`,
			match: `^keys\[0\] \(id "a"\): line 1, column \d+: "metadata" must be a string, not a JSON number$`,
		},
		{name: "entry not an object", data: `{"keys": ["a"]}`, match: `^keys\[0\]: line 1, column \d+: value must be an object, not a JSON string$`},
		{name: "missing id", data: `{"keys": [{"hash": "` + hash1 + `"}]}`, want: `keys[0]: missing "id"`},
		{name: "missing hash", data: `{"keys": [{"id": "a"}]}`, want: `keys[0] (id "a"): missing "hash" (sha256:<64 hex digits>)`},
		{
			name: "duplicate id",
			data: `{"keys": [` + entryA + `, {"id": "b", "hash": "` + hash2 + `"}, {"id": "a", "hash": "` + hash3 + `"}]}`,
			want: `keys[2] (id "a"): duplicate id (also keys[0])`,
		},
		{
			name: "duplicate hash",
			data: `{"keys": [{"id": "x", "hash": "` + hash2 + `"}, ` + entryA + `, {"id": "b", "hash": "` + hash1 + `"}]}`,
			want: `keys[2] (id "b"): duplicate hash (same as keys[1], id "a")`,
		},
		{
			name: "duplicate hash in upper case",
			data: `{"keys": [` + entryA + `, {"id": "b", "hash": "sha256:` + strings.ToUpper(hash1[len("sha256:"):]) + `"}]}`,
			want: `keys[1] (id "b"): duplicate hash (same as keys[0], id "a")`,
		},
		{
			name: "hash without prefix",
			data: `{"keys": [{"id": "a", "hash": "` + hash1[len("sha256:"):] + `"}]}`,
			want: `keys[0] (id "a"): "hash" must start with "sha256:"`,
		},
		{
			name: "hash with another algorithm",
			data: `{"keys": [{"id": "a", "hash": "sha512:` + hash1[len("sha256:"):] + `"}]}`,
			want: `keys[0] (id "a"): "hash" must start with "sha256:"`,
		},
		{
			name: "hash too short",
			data: `{"keys": [{"id": "a", "hash": "` + hash1[:len(hash1)-1] + `"}]}`,
			want: `keys[0] (id "a"): "hash" must be "sha256:" and 64 hex digits, not 63 characters`,
		},
		{
			name: "hash not hex",
			data: `{"keys": [{"id": "a", "hash": "sha256:` + strings.Repeat("z", 64) + `"}]}`,
			want: `keys[0] (id "a"): "hash" has a character that is not a hex digit`,
		},
		{
			name: "bad rate",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "rate": "fast"}]}`,
			want: `keys[0] (id "a"): "rate": rate "fast": want <count>/<duration>, such as 600/1m`,
		},
		{
			name: "rate with zero count",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "rate": "0/1m"}]}`,
			want: `keys[0] (id "a"): "rate": rate "0/1m": count must be a whole number from 1 to 1000000000`,
		},
		{
			name: "burst with rate off",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "rate": "off", "burst": 5}]}`,
			want: `keys[0] (id "a"): "burst" makes no sense with "rate": "off"`,
		},
		{
			name: "negative burst without rate",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "burst": -1}]}`,
			want: `keys[0] (id "a"): "burst": burst must be a whole number from 1 to 1000000000`,
		},
		{
			name: "burst zero",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "burst": 0}]}`,
			want: `keys[0] (id "a"): "burst": burst must be a whole number from 1 to 1000000000`,
		},
		{
			name: "negative burst with rate",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "rate": "10/1m", "burst": -1}]}`,
			want: `keys[0] (id "a"): "burst": burst must be a whole number from 1 to 1000000000`,
		},
		{
			name: "burst too large",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "rate": "10/1m", "burst": 1000000001}]}`,
			want: `keys[0] (id "a"): "burst": burst must be a whole number from 1 to 1000000000`,
		},
		{
			name: "bad metadata name",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "metadata": {"a b": "x"}}]}`,
			want: `keys[0] (id "a"): metadata field "a b": use letters, digits, '_', '-' and '.' only`,
		},
		{
			name: "empty metadata name",
			data: `{"keys": [{"id": "a", "hash": "` + hash1 + `", "metadata": {"": "x"}}]}`,
			want: `keys[0] (id "a"): metadata field "": use letters, digits, '_', '-' and '.' only`,
		},
		{
			name: "id too long",
			data: `{"keys": [{"id": "` + strings.Repeat("i", 129) + `", "hash": "` + hash1 + `"}]}`,
			want: `keys[0] (id "` + strings.Repeat("i", 129) + `"): "id" is longer than 128 characters`,
		},
		{
			name: "id with a space",
			data: `{"keys": [{"id": "a b", "hash": "` + hash1 + `"}]}`,
			want: `keys[0] (id "a b"): "id" "a b": use visible ASCII characters other than quotes and backslash`,
		},
		{
			name: "id with a quote",
			data: `{"keys": [{"id": "a\"b", "hash": "` + hash1 + `"}]}`,
			want: `keys[0] (id "a\"b"): "id" "a\"b": use visible ASCII characters other than quotes and backslash`,
		},
		{
			name: "id with non-ASCII",
			data: `{"keys": [{"id": "é", "hash": "` + hash1 + `"}]}`,
			want: `keys[0] (id "é"): "id" "é": use visible ASCII characters other than quotes and backslash`,
		},
		{
			// encoding/json alone keeps the last: the key would serve.
			name: "disabled twice",
			data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "disabled": true, "disabled": false}]}`,
			want: `keys[0] (id "c"): "disabled" appears twice`,
		},
		{
			name: "expires twice, in a later entry",
			data: `{"keys": [` + entryA + `, {"id": "c", "expires": "2001-01-01T00:00:00Z", "hash": "` + hash2 + `", "expires": "2099-01-01T00:00:00Z"}]}`,
			want: `keys[1] (id "c"): "expires" appears twice`,
		},
		{
			// Labelled by the id encoding/json reads, the last.
			name: "id twice",
			data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "id": "d"}]}`,
			want: `keys[0] (id "d"): "id" appears twice`,
		},
		{name: "hash twice", data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "hash": "` + hash2 + `"}]}`, want: `keys[0] (id "c"): "hash" appears twice`},
		{name: "burst twice", data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "burst": 5, "burst": 6}]}`, want: `keys[0] (id "c"): "burst" appears twice`},
		{
			name: "restriction twice",
			data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "allow_ips": ["10.0.0.0/8"], "allow_ips": []}]}`,
			want: `keys[0] (id "c"): "allow_ips" appears twice`,
		},
		{name: "metadata twice", data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "metadata": {}, "metadata": {"a": "b"}}]}`, want: `keys[0] (id "c"): "metadata" appears twice`},
		{
			// encoding/json matches a field's name in any case.
			name: "a field twice in another case",
			data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "disabled": true, "Disabled": false}]}`,
			want: `keys[0] (id "c"): "disabled" appears twice (as "disabled" and "Disabled")`,
		},
		{
			name: "a field twice, once escaped",
			data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "disabled": true, "disabl\u0065d": false}]}`,
			want: `keys[0] (id "c"): "disabled" appears twice`,
		},
		{
			name: "metadata field twice",
			data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "metadata": {"tier": "gold", "region": "eu", "tier": "free"}}]}`,
			want: `keys[0] (id "c"): metadata field "tier" appears twice`,
		},
		{
			name: "metadata field twice, once escaped",
			data: `{"keys": [{"id": "c", "hash": "` + hash1 + `", "metadata": {"tier": "gold", "ti\u0065r": "free"}}]}`,
			want: `keys[0] (id "c"): metadata field "tier" appears twice`,
		},
		{name: "trailing data", data: `{"keys": []} x`, want: "unexpected data after the closing }"},
		{name: "second object", data: `{"keys": []}{"keys": []}`, want: "unexpected data after the closing }"},
		{name: "trailing closing brace", data: `{"keys": []}}`, want: "unexpected data after the closing }"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := parseKeysFile([]byte(tt.data))
			if err == nil {
				t.Fatalf("parseKeysFile succeeded with %d keys, want an error", set.len())
			}
			if set != nil {
				t.Errorf("parseKeysFile returned a set with its error")
			}
			if tt.match != "" {
				if !regexp.MustCompile(tt.match).MatchString(err.Error()) {
					t.Errorf("error = %q, want a match for %q", err, tt.match)
				}
			} else if err.Error() != tt.want {
				t.Errorf("error = %q\nwant    %q", err, tt.want)
			}
		})
	}
}

// Only a name twice in one object is refused: a metadata field named like
// a field of the entry, metadata fields that differ in case, the same
// names in two entries, and names inside strings are not; both parsers
// read such files, alike.
func TestRepeatedFieldsNotConfused(t *testing.T) {
	h1, h2 := `"hash": "`+hash1+`"`, `"hash": "`+hash2+`"`
	for _, data := range []string{
		`{"keys": [{"id": "a", ` + h1 + `, "metadata": {"id": "x", "hash": "y", "disabled": "z"}}]}`,
		`{"keys": [{"id": "a", ` + h1 + `, "metadata": {"tier": "x", "Tier": "y", "TIER": "z"}}]}`,
		`{"keys": [{"id": "a", ` + h1 + `, "metadata": {"tier": "x"}, "disabled": true}, {"id": "b", ` + h2 + `, "metadata": {"tier": "x"}, "disabled": true}]}`,
		`{"keys": [{"id": "a", "name": "\"id\": \"b\", \"name\": {", ` + h1 + `, "owner": "id"}]}`,
		`{"keys": [{"ID": "a", "Hash": "` + hash1 + `", "Disabled": true, "METADATA": {"t": "1"}}]}`,
		`{"keys": [{"id": "a", ` + h1 + `, "allow_methods": ["GET", "GET"], "metadata": {}}]}`,
	} {
		scanned, decoded := checkScanAgrees(t, []byte(data))
		if !decoded {
			_, err := decodeKeysFile([]byte(data), new(recordAlloc))
			t.Errorf("decodeKeysFile: %v\nfile: %s", err, data)
		}
		if set, err := parseKeysFile([]byte(data)); err != nil {
			t.Errorf("parseKeysFile: %v (scanned %v)\nfile: %s", err, scanned, data)
		} else if d := digestOf(t, hash1); set.get(&d) == nil {
			t.Errorf("key a not loaded\nfile: %s", data)
		}
	}
}

func TestLoadKeysFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	writeKeysFile(t, good, `{"keys": [{"id": "a", "hash": "`+hash1+`"}]}`)
	bad := filepath.Join(dir, "bad.json")
	writeKeysFile(t, bad, `{"keys": [{"id": "a"}]}`)
	missing := filepath.Join(dir, "missing.json")

	t.Run("valid file", func(t *testing.T) {
		set, stamp, sum, err := loadKeysFile(good)
		if err != nil {
			t.Fatalf("loadKeysFile: %v", err)
		}
		// A file written this instant gets the zero stamp, so that a
		// second write in the same time tick is not missed.
		if set.len() != 1 || stamp != (fileStamp{}) || sum == ([32]byte{}) {
			t.Errorf("got %d keys, stamp %+v, sum %x", set.len(), stamp, sum)
		}
		saved := recentWrite
		recentWrite = 0
		defer func() { recentWrite = saved }()
		if _, stamp, _, err := loadKeysFile(good); err != nil || stamp.size == 0 || stamp.ctime.IsZero() || stamp.inode == 0 {
			t.Errorf("stamp of an older file = %+v, %v", stamp, err)
		}
	})
	tests := []struct {
		name   string
		path   string
		want   string
		wantIs error
	}{
		{name: "missing file", path: missing, want: "loading keys file " + missing + ": ", wantIs: fs.ErrNotExist},
		{name: "directory", path: dir, want: "loading keys file " + dir + ": not a regular file (a directory)", wantIs: regularfile.ErrNotRegular},
		{name: "broken file", path: bad, want: "loading keys file " + bad + `: keys[0] (id "a"): missing "hash"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, _, err := loadKeysFile(tt.path)
			if err == nil {
				t.Fatal("loadKeysFile succeeded, want an error")
			}
			if !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("error = %q, want it to start with %q", err, tt.want)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("error = %v, want it to wrap %v", err, tt.wantIs)
			}
			if _, err := openKeysFile(tt.path, zap.NewNop()); err == nil || !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("openKeysFile error = %v, want it to start with %q", err, tt.want)
			}
		})
	}
}

// writeKeysFile writes a keys file through a rename, as editors and
// deploy tools do, and gives it a modification time later than any before,
// so that a change is seen even where timestamps are coarse.
func writeKeysFile(t *testing.T, path, data string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	mtime := nextMtime()
	if err := os.Chtimes(tmp, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

var mtimeSeq = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

func nextMtime() time.Time {
	mtimeSeq = mtimeSeq.Add(time.Second)
	return mtimeSeq
}

// slowPolling stops the watcher from checking on its own during a test.
func slowPolling(t testing.TB) {
	t.Helper()
	saved := keysFilePollInterval
	keysFilePollInterval = time.Hour
	t.Cleanup(func() { keysFilePollInterval = saved })
}

func openTestKeysFile(t *testing.T, path string) *keysFile {
	t.Helper()
	kf, err := openKeysFile(path, zap.NewNop())
	if err != nil {
		t.Fatalf("openKeysFile: %v", err)
	}
	t.Cleanup(func() {
		if err := kf.Destruct(); err != nil {
			t.Errorf("Destruct: %v", err)
		}
	})
	return kf
}

// ids returns the sorted ids of a key set.
func ids(set *keySet) string {
	var out []string
	for _, rec := range set.all() {
		out = append(out, rec.id)
	}
	slices.Sort(out)
	return strings.Join(out, ",")
}

func keysJSON(entries ...[2]string) string {
	var parts []string
	for _, e := range entries {
		parts = append(parts, fmt.Sprintf(`{"id": %q, "hash": %q}`, e[0], e[1]))
	}
	return `{"keys": [` + strings.Join(parts, ", ") + `]}`
}

func TestKeysFileReload(t *testing.T) {
	slowPolling(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "keys.json")
	writeKeysFile(t, path, keysJSON([2]string{"a", hash1}))
	kf := openTestKeysFile(t, path)

	first := kf.set.Load()
	if got := ids(first); got != "a" {
		t.Fatalf("initial ids = %q, want a", got)
	}

	// Each step runs on the state the previous one left.
	steps := []struct {
		name    string
		change  func(t *testing.T)
		wantErr string // a substring of check's error; "" for none
		// wantIDs are the ids of the set in use afterwards; same says the
		// set must be the very set in use before the step.
		wantIDs string
		same    bool
	}{
		{
			name:    "unchanged file",
			change:  func(t *testing.T) {},
			wantIDs: "a",
			same:    true,
		},
		{
			name:    "new keys",
			change:  func(t *testing.T) { writeKeysFile(t, path, keysJSON([2]string{"a", hash1}, [2]string{"b", hash2})) },
			wantIDs: "a,b",
		},
		{
			name:    "broken file keeps the keys",
			change:  func(t *testing.T) { writeKeysFile(t, path, `{"keys": [{"id": "a"}]}`) },
			wantErr: `loading keys file ` + path + `: keys[0] (id "a"): missing "hash"`,
			wantIDs: "a,b",
			same:    true,
		},
		{
			name:    "still broken",
			change:  func(t *testing.T) {},
			wantErr: `missing "hash"`,
			wantIDs: "a,b",
			same:    true,
		},
		{
			name:    "fixed with the same keys as in use",
			change:  func(t *testing.T) { writeKeysFile(t, path, keysJSON([2]string{"a", hash1}, [2]string{"b", hash2})) },
			wantIDs: "a,b",
			same:    true,
		},
		{
			name: "same content with a new mtime",
			change: func(t *testing.T) {
				mtime := nextMtime()
				if err := os.Chtimes(path, mtime, mtime); err != nil {
					t.Fatal(err)
				}
			},
			wantIDs: "a,b",
			same:    true,
		},
		{
			name:    "empty file keeps the keys",
			change:  func(t *testing.T) { writeKeysFile(t, path, "") },
			wantErr: "file is empty",
			wantIDs: "a,b",
			same:    true,
		},
		{
			name: "a field twice keeps the keys",
			change: func(t *testing.T) {
				writeKeysFile(t, path, `{"keys": [{"id": "a", "hash": "`+hash1+`", "disabled": false, "disabled": true}]}`)
			},
			wantErr: `loading keys file ` + path + `: keys[0] (id "a"): "disabled" appears twice`,
			wantIDs: "a,b",
			same:    true,
		},
		{
			name:    "a key removed",
			change:  func(t *testing.T) { writeKeysFile(t, path, keysJSON([2]string{"b", hash2})) },
			wantIDs: "b",
		},
		{
			name: "file removed keeps the keys",
			change: func(t *testing.T) {
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "keys file " + path + ": ",
			wantIDs: "b",
			same:    true,
		},
		{
			name:    "file back",
			change:  func(t *testing.T) { writeKeysFile(t, path, keysJSON([2]string{"c", hash3})) },
			wantIDs: "c",
		},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			before := kf.set.Load()
			st.change(t)
			err := kf.check()
			switch {
			case st.wantErr == "" && err != nil:
				t.Errorf("check: %v", err)
			case st.wantErr != "" && err == nil:
				t.Errorf("check succeeded, want an error containing %q", st.wantErr)
			case st.wantErr != "" && !strings.Contains(err.Error(), st.wantErr):
				t.Errorf("check error = %q, want it to contain %q", err, st.wantErr)
			}
			after := kf.set.Load()
			if got := ids(after); got != st.wantIDs {
				t.Errorf("ids = %q, want %q", got, st.wantIDs)
			}
			if st.same && after != before {
				t.Errorf("the key set was replaced")
			}
			if !st.same {
				if after == before {
					t.Errorf("the key set was not replaced")
				} else if after.gen <= before.gen {
					t.Errorf("new set has generation %d, not above %d", after.gen, before.gen)
				}
			}
		})
	}
}

func TestKeysFileReloadSymlink(t *testing.T) {
	slowPolling(t)
	dir := t.TempDir()
	a := filepath.Join(dir, "a.json")
	b := filepath.Join(dir, "b.json")
	link := filepath.Join(dir, "keys.json")
	writeKeysFile(t, a, keysJSON([2]string{"a", hash1}))
	writeKeysFile(t, b, keysJSON([2]string{"b", hash2}))
	if err := os.Symlink(a, link); err != nil {
		t.Skipf("symlinks not supported: %v", err)
	}
	kf := openTestKeysFile(t, link)
	before := kf.set.Load()
	if got := ids(before); got != "a" {
		t.Fatalf("initial ids = %q, want a", got)
	}

	// Re-point the link atomically, as Kubernetes does with ConfigMaps.
	tmp := filepath.Join(dir, "keys.json.new")
	if err := os.Symlink(b, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
	if err := kf.check(); err != nil {
		t.Fatalf("check: %v", err)
	}
	after := kf.set.Load()
	if got := ids(after); got != "b" {
		t.Errorf("ids after the swap = %q, want b", got)
	}
	if after.gen <= before.gen {
		t.Errorf("new set has generation %d, not above %d", after.gen, before.gen)
	}

	// A dangling link keeps the keys.
	if err := os.Remove(b); err != nil {
		t.Fatal(err)
	}
	if err := kf.check(); err == nil {
		t.Errorf("check of a dangling link succeeded")
	}
	if kf.set.Load() != after {
		t.Errorf("the key set was replaced after the link broke")
	}
}

// A named pipe at the keys file's path, read the ordinary way, waits for a
// writer: Caddy hung at start-up. Loading it fails at once.
func TestLoadKeysFileNamedPipe(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "keys.json")
	mkfifo(t, fifo)
	link := filepath.Join(dir, "link.json")
	if err := os.Symlink(fifo, link); err != nil {
		t.Skipf("symlinks not supported: %v", err)
	}
	for _, path := range []string{fifo, link} {
		want := "loading keys file " + path + ": not a regular file (a named pipe)"
		var err error
		testutil.Within(t, "loadKeysFile("+path+")", func() { _, _, _, err = loadKeysFile(path) })
		if err == nil || err.Error() != want || !errors.Is(err, regularfile.ErrNotRegular) {
			t.Errorf("loadKeysFile(%s) error = %v, want %s", path, err, want)
		}
		testutil.Within(t, "openKeysFile("+path+")", func() { _, err = openKeysFile(path, zap.NewNop()) })
		if err == nil || err.Error() != want {
			t.Errorf("openKeysFile(%s) error = %v, want %s", path, err, want)
		}
	}
}

// A keys file replaced by a symlink to a named pipe: a reload fails at
// once, the keys in use stay, and kf.mu is not left held (which would
// wedge the watcher, config reloads and the admin API).
func TestKeysFileReloadNamedPipe(t *testing.T) {
	slowPolling(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "keys.json")
	writeKeysFile(t, path, keysJSON([2]string{"a", hash1}))
	kf := openTestKeysFile(t, path)
	before := kf.set.Load()

	fifo := filepath.Join(dir, "fifo")
	mkfifo(t, fifo)
	tmp := filepath.Join(dir, "keys.json.new")
	if err := os.Symlink(fifo, tmp); err != nil {
		t.Skipf("symlinks not supported: %v", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}

	want := "loading keys file " + path + ": not a regular file (a named pipe)"
	for _, reload := range []struct {
		name string
		f    func() error
	}{
		{"reloadNow", func() error { _, err := kf.reloadNow(); return err }},
		{"reloadNow again", func() error { _, err := kf.reloadNow(); return err }},
		{"check", kf.check},
	} {
		var err error
		testutil.Within(t, reload.name, func() { err = reload.f() })
		if err == nil || err.Error() != want {
			t.Errorf("%s error = %v, want %s", reload.name, err, want)
		}
		if kf.set.Load() != before {
			t.Fatalf("%s replaced the keys in use", reload.name)
		}
		if d := digestOf(t, hash1); kf.set.Load().get(&d) == nil {
			t.Fatalf("after %s key a is not served", reload.name)
		}
	}
	testutil.Within(t, "taking kf.mu", func() { kf.mu.Lock(); kf.mu.Unlock() })

	// A regular file back is loaded.
	writeKeysFile(t, path, keysJSON([2]string{"b", hash2}))
	if err := kf.check(); err != nil || ids(kf.set.Load()) != "b" {
		t.Errorf("after the file is back: %v, ids %q; want b", err, ids(kf.set.Load()))
	}
}

// TestKeysFileWatcher checks that the watcher picks up a change on its own.
func TestKeysFileWatcher(t *testing.T) {
	saved := keysFilePollInterval
	keysFilePollInterval = 5 * time.Millisecond
	t.Cleanup(func() { keysFilePollInterval = saved })
	path := filepath.Join(t.TempDir(), "keys.json")
	writeKeysFile(t, path, keysJSON([2]string{"a", hash1}))
	kf := openTestKeysFile(t, path)

	writeKeysFile(t, path, keysJSON([2]string{"b", hash2}))
	deadline := time.Now().Add(5 * time.Second)
	for ids(kf.set.Load()) != "b" {
		if time.Now().After(deadline) {
			t.Fatalf("the watcher did not reload the file; ids = %q", ids(kf.set.Load()))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestKeysFileCheckWhileWatching calls check while the watcher runs, as
// Provision does when a config reload finds the file already open. Under
// -race it fails if the two are not synchronized.
func TestKeysFileCheckWhileWatching(t *testing.T) {
	saved := keysFilePollInterval
	keysFilePollInterval = time.Millisecond
	t.Cleanup(func() { keysFilePollInterval = saved })
	path := filepath.Join(t.TempDir(), "keys.json")
	writeKeysFile(t, path, keysJSON([2]string{"k0", hash1}))
	kf := openTestKeysFile(t, path)

	hashes := []string{hash1, hash2, hash3, hash4}
	for i := 1; i <= 20; i++ {
		writeKeysFile(t, path, keysJSON([2]string{fmt.Sprintf("k%d", i), hashes[i%len(hashes)]}))
		_ = kf.check() // the watcher may have read a file mid-rename
		time.Sleep(2 * time.Millisecond)
	}
	if err := kf.check(); err != nil {
		t.Fatalf("check: %v", err)
	}
	if got := ids(kf.set.Load()); got != "k20" {
		t.Errorf("ids = %q, want k20", got)
	}
}

// TestKeysFileInPlaceEditWithOldMtime rewrites the file in place, with the
// same size, and puts its old mtime back, as cp -p and rsync -t do: the
// change time still tells, and the new keys are used. A broken version is
// reported on every check until it is fixed, and the same bytes are not
// parsed twice (the error stays the same one).
func TestKeysFileInPlaceEditWithOldMtime(t *testing.T) {
	slowPolling(t)
	saved := recentWrite
	recentWrite = 0 // every stamp counts, however new
	t.Cleanup(func() { recentWrite = saved })

	path := filepath.Join(t.TempDir(), "keys.json")
	writeKeysFile(t, path, keysJSON([2]string{"a", hash1}))
	kf := openTestKeysFile(t, path)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	// Same length: only the hash changes, in place.
	if err := os.WriteFile(path, []byte(keysJSON([2]string{"a", hash2})), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	if err := kf.check(); err != nil {
		t.Fatalf("check: %v", err)
	}
	d2 := mustDigest(t, hash2)
	if kf.set.Load().get(&d2) == nil {
		t.Fatal("the in-place edit with the old mtime was missed")
	}

	if err := os.WriteFile(path, []byte(`{"keys": [{"id": "a"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	first := kf.check()
	if first == nil {
		t.Fatal("a broken file was accepted")
	}
	for range 3 {
		if err := kf.check(); err != first {
			t.Fatalf("check of the unchanged broken file = %v, want the same error %v", err, first)
		}
	}
	if kf.set.Load().get(&d2) == nil {
		t.Fatal("the keys in use were lost to a broken file")
	}
}

func mustDigest(t *testing.T, s string) [32]byte {
	t.Helper()
	d, err := parseDigest(s)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestParseDigestPrefixCase(t *testing.T) {
	for _, s := range []string{hash1, "SHA256:" + hash1[len("sha256:"):], "Sha256:" + hash1[len("sha256:"):]} {
		if d, err := parseDigest(s); err != nil || d != mustDigest(t, hash1) {
			t.Errorf("parseDigest(%q) = %x, %v", s, d, err)
		}
	}
}

// A config reload that adds a plan and, at the same time, a key on it:
// the new file version loads though the old config lacks the plan (it
// only refuses that key), so the new config finds it in use.
func TestKeysFileVersionWithPlanOfNewConfig(t *testing.T) {
	slowPolling(t)
	path := filepath.Join(t.TempDir(), "keys.json")
	writeKeysFile(t, path, keysJSON([2]string{"a", hash1}))
	kf := openTestKeysFile(t, path)
	oldCfg := &Handler{plans: map[string]*plan{}}
	newCfg := &Handler{plans: map[string]*plan{"gold": {name: "gold"}}}
	if err := kf.addCheck(oldCfg, oldCfg.checkPlans); err != nil {
		t.Fatalf("addCheck(old): %v", err)
	}
	writeKeysFile(t, path, `{"keys": [{"id": "a", "hash": "`+hash1+`"}, {"id": "g", "hash": "`+hash2+`", "plan": "gold"}]}`)
	if err := kf.check(); err != nil {
		t.Fatalf("check with the old config there: %v", err)
	}
	if got := ids(kf.set.Load()); got != "a,g" {
		t.Fatalf("keys = %s, want a,g", got)
	}
	if err := kf.addCheck(newCfg, newCfg.checkPlans); err != nil {
		t.Fatalf("addCheck(new): %v", err)
	}
	// A config without the plan cannot load while a key on it is in use.
	if err := kf.addCheck(&Handler{plans: map[string]*plan{}}, (&Handler{plans: map[string]*plan{}}).checkPlans); err == nil ||
		!strings.Contains(err.Error(), `key id "g": unknown plan "gold"`) {
		t.Fatalf("addCheck of a config without the plan = %v, want unknown plan", err)
	}
}

// Times outside the years that nanoseconds since 1970 can hold are
// clamped, not wrapped: year 9999 is never, year 1000 long past.
func TestParseTimeFarAway(t *testing.T) {
	h := Handler{now: func() int64 { return time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC).UnixNano() }}
	for _, tc := range []struct {
		name, expires, notBefore, want string
	}{
		{"expires in 9999", "9999-12-31T23:59:59Z", "", ""},
		{"expires in 1000", "1000-01-01T00:00:00Z", "", outcomeExpired},
		{"expires in 1970", "1970-01-01T00:00:00Z", "", outcomeExpired},
		{"not before 9999", "", "9999-01-01T00:00:00Z", outcomeNotYetValid},
		{"not before 1000", "", "1000-01-01T00:00:00Z", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec, err := keyFileEntry{ID: "x", Hash: hash1, Expires: tc.expires, NotBefore: tc.notBefore}.record()
			if err != nil {
				t.Fatal(err)
			}
			if got, _ := h.lifecycle(rec); got != tc.want {
				t.Errorf("outcome = %q, want %q", got, tc.want)
			}
		})
	}
}

// recordDiff says how two records differ, the fields they share with
// other keys included; "" when they do not.
func recordDiff(a, b *keyRecord) string {
	type view struct {
		ID, Name, Owner, Plan string
		Digest                [32]byte
		Metadata              map[string]string
		LimitMode, QuotaMode  limitMode
		Limit                 ratelimit.Limit
		Policy                policy
		Burst                 int64
		Quota                 string
		Restr                 restrictions
		NotBefore, Expires    int64
		Disabled              bool
		IDAny, NameAny        any
		OwnerAny, PlanAny     any
		MetadataAny           map[string]any
		Provider              bool
	}
	of := func(r *keyRecord) view {
		return view{
			ID: r.id, Name: r.name, Owner: r.owner, Plan: r.plan, Digest: r.digest, Metadata: r.metadata,
			LimitMode: r.limitMode, QuotaMode: r.quotaMode, Limit: r.limit, Policy: r.policy, Burst: r.burst,
			Quota: r.quota.String(), Restr: r.restr, NotBefore: r.notBefore, Expires: r.expires, Disabled: r.disabled,
			IDAny: r.idAny, NameAny: r.nameAny, OwnerAny: r.ownerAny, PlanAny: r.planAny, MetadataAny: r.metadataAny,
			Provider: r.provider != nil,
		}
	}
	va, vb := of(a), of(b)
	if reflect.DeepEqual(va, vb) {
		return ""
	}
	return fmt.Sprintf("%+v\nagainst %+v", va, vb)
}

// checkScanAgrees checks that whenever scanKeysFile reads data, it makes the
// records that decodeKeysFile makes of it. It reports whether
// scanKeysFile read it and whether decodeKeysFile did.
func checkScanAgrees(t *testing.T, data []byte) (scanned, decoded bool) {
	t.Helper()
	fast := scanKeysFile(data, new(recordAlloc))
	slow, err := decodeKeysFile(data, new(recordAlloc))
	if fast == nil {
		return false, err == nil
	}
	if err != nil {
		t.Fatalf("scanKeysFile read %d keys of a file that encoding/json refuses: %v\nfile: %q", fast.len(), err, data)
	}
	if fast.len() != slow.len() {
		t.Fatalf("scanKeysFile read %d keys, encoding/json %d\nfile: %q", fast.len(), slow.len(), data)
	}
	for d, rec := range slow.all() {
		other := fast.get(&d)
		if other == nil {
			t.Fatalf("scanKeysFile lost key %q\nfile: %q", rec.id, data)
		}
		if diff := recordDiff(other, rec); diff != "" {
			t.Fatalf("scanKeysFile read key %q as\n%s (encoding/json)\nfile: %q", rec.id, diff, data)
		}
	}
	return true, true
}

// randomKeysFile writes a keys file of a few entries, mostly valid, in the
// many ways JSON allows: spacing, field order, escapes, non-ASCII, names in
// other cases, nulls, fields twice, numbers of every form; and now and then
// a value that is invalid, as JSON or as a key's setting. odd reports that
// it wrote the file's top level in a way that scanKeysFile leaves to
// encoding/json.
func randomKeysFile(r *rand.Rand) (data []byte, odd bool) {
	pick := func(opts ...string) string { return opts[r.IntN(len(opts))] }
	// good or, one time in sixteen, bad.
	either := func(good, bad []string) string {
		if r.IntN(16) == 0 {
			return pick(bad...)
		}
		return pick(good...)
	}
	sp := func() string {
		switch n := r.IntN(600); {
		case n == 0:
			return pick("\f", "\v", "\u00a0", "\x00")
		case n < 200:
			return pick(" ", "\n", "\t", "\r\n", "  ")
		}
		return ""
	}
	// quote writes s as a JSON string, at times with an escape, a
	// character beyond ASCII or bytes that JSON refuses or replaces.
	quote := func(s string) string {
		switch r.IntN(80) {
		case 0, 1:
			return `"` + s + `\u0061"`
		case 2:
			return `"` + s + `\"x"`
		case 3, 4:
			return `"` + s + "é日" + `"`
		case 5:
			return `"` + s + "\xff" + `"`
		case 6:
			return `"` + s + `\/"`
		case 7:
			return `"` + s + "\x01" + `"`
		case 8:
			return `"` + s + "\x7f" + `"`
		}
		return `"` + s + `"`
	}
	str := func(good []string, bad ...string) string { return quote(either(good, append(bad, "null", "1"))) }
	strList := func(good []string, bad ...string) string {
		parts := make([]string, 1+r.IntN(2))
		if r.IntN(16) == 0 {
			parts = nil
		}
		for i := range parts {
			parts[i] = str(good, bad...)
		}
		if r.IntN(16) == 0 {
			return pick("null", `"x"`, "{}")
		}
		return "[" + sp() + strings.Join(parts, ","+sp()) + sp() + "]"
	}
	var fields = map[string]func() string{
		"name":  func() string { return str([]string{"Alpha", "", "a name"}) },
		"owner": func() string { return str([]string{"team-a", ""}) },
		"plan":  func() string { return str([]string{"pro", "free"}, "bad plan", "") },
		"rate":  func() string { return str([]string{"10/1s", "600/1m", "off", "5000/d", ""}, "fast", "0/1m") },
		"burst": func() string {
			return either([]string{"5", "3", "1000000000"}, []string{"0", "-1", "07", "5.0", "1e2", "-0", "1000000001", "99999999999999999999", `"5"`, "null", "5x"})
		},
		"quota": func() string { return str([]string{"100/day", "10/hour", "off", ""}, "5/fortnight") },
		"not_before": func() string {
			return str([]string{"2020-01-01T00:00:00Z", "2030-01-01T00:00:00+02:00", ""}, "yesterday")
		},
		"expires": func() string {
			return str([]string{"2031-01-01T00:00:00Z", "2035-06-01T12:00:00-07:00", ""}, "2019-01-01T00:00:00Z")
		},
		"disabled": func() string {
			return either([]string{"true", "false"}, []string{`"true"`, "null", "tru", "falsey", "0"})
		},
		"metadata": func() string {
			if r.IntN(12) == 0 {
				return pick("null", `{"a": 1}`, `[]`, `{"a" "b"}`, `{"a": "b",}`)
			}
			parts := make([]string, r.IntN(3))
			for i := range parts {
				parts[i] = str([]string{"tier", "region.eu", "tier"}, "a b", "") + sp() + ":" + sp() + str([]string{"gold", "", "x"})
			}
			return "{" + sp() + strings.Join(parts, ","+sp()) + sp() + "}"
		},
		"allow_ips":       func() string { return strList([]string{"10.0.0.0/8", "::1", "192.168.1.1"}, "nope") },
		"allow_methods":   func() string { return strList([]string{"GET", "post"}, "BAD METHOD") },
		"allow_paths":     func() string { return strList([]string{"/v1", "/v2/*"}, "relative") },
		"allow_referrers": func() string { return strList([]string{"https://*.example.com/*", "example.org"}, "") },
	}
	names := slices.Sorted(maps.Keys(fields))
	entry := func(i int) string {
		var parts []string
		add := func(name, value string) {
			key := `"` + name + `"`
			switch r.IntN(120) {
			case 0:
				key = `"` + strings.ToUpper(name) + `"`
			case 1:
				key = `"` + name[:1] + `\u00` + fmt.Sprintf("%x", name[1]) + name[2:] + `"`
			case 2:
				key = `"unknown"`
			case 3:
				key = name
			}
			parts = append(parts, key+sp()+":"+sp()+value)
		}
		if r.IntN(30) > 0 {
			add("id", `"`+either([]string{fmt.Sprintf("k%d", i)}, []string{"k1", "a b", "", strings.Repeat("i", 129), `k\u0031`})+`"`)
		}
		if r.IntN(30) > 0 {
			hex := sha256Hex(fmt.Sprint(i))[len("sha256:"):]
			add("hash", `"`+either([]string{"sha256:" + hex, "sha256:" + strings.ToUpper(hex), "SHA256:" + hex},
				[]string{sha256Hex(fmt.Sprint(i - 1)), "sha256:" + hex[1:], "sha256:" + strings.Repeat("g", 64), "md5:00", hex, `sha256:\u0030` + hex[1:]})+`"`)
		}
		for _, name := range names {
			if r.IntN(5) == 0 {
				add(name, fields[name]())
			}
		}
		if r.IntN(20) == 0 {
			name := pick(names...)
			add(name, fields[name]()) // a field twice
		}
		r.Shuffle(len(parts), func(i, j int) { parts[i], parts[j] = parts[j], parts[i] })
		if r.IntN(40) == 0 {
			return pick("null", `"a"`, "[]", "{}", "1")
		}
		return "{" + sp() + strings.Join(parts, ","+sp()) + sp() + "}"
	}
	entries := make([]string, r.IntN(4))
	for i := range entries {
		entries[i] = entry(i + 1)
	}
	keysName := `"keys"`
	if r.IntN(30) == 0 {
		keysName, odd = `"k\u0065ys"`, true
	}
	var b strings.Builder
	b.WriteString(sp() + "{" + sp() + keysName + sp() + ":" + sp() + "[" + sp())
	b.WriteString(strings.Join(entries, sp()+","+sp()))
	b.WriteString(sp() + "]" + sp() + "}" + sp())
	return []byte(b.String()), odd
}

// mutate changes a few bytes of data, mostly into JSON's own, and mostly
// where JSON has its own.
func mutate(r *rand.Rand, data []byte) []byte {
	out := slices.Clone(data)
	const alphabet = "{}[]:,\"\\ \n0123456789-.etrufalsnx\x00\x1f\x80\xc3\xa9"
	for range 1 + r.IntN(3) {
		c := alphabet[r.IntN(len(alphabet))]
		i := r.IntN(len(out) + 1)
		for range 8 {
			if i == len(out) || strings.IndexByte("{}[]:,\"\\", out[i]) >= 0 {
				break
			}
			i = r.IntN(len(out) + 1)
		}
		switch {
		case len(out) == 0 || r.IntN(3) == 0:
			out = slices.Insert(out, i, c)
		case r.IntN(2) == 0 && i < len(out):
			out = slices.Delete(out, i, i+1)
		case i < len(out):
			out[i] = c
		}
	}
	return out
}

// TestScanKeysFileAgrees checks the fast path against encoding/json on
// random keys files and on broken copies of them: whatever scanKeysFile
// reads, it reads as encoding/json does, and every valid file whose top
// level is written plainly it reads itself.
func TestScanKeysFileAgrees(t *testing.T) {
	r := rand.New(rand.NewPCG(6, 1_000_000))
	rounds := 5000
	if testing.Short() {
		rounds = 500
	}
	var scanned, valid, mutatedScanned int
	for range rounds {
		data, odd := randomKeysFile(r)
		s, d := checkScanAgrees(t, data)
		if d && !s && !odd {
			t.Fatalf("scanKeysFile left a valid file to encoding/json: %q", data)
		}
		if s {
			scanned++
		}
		if d {
			valid++
		}
		if s, _ := checkScanAgrees(t, mutate(r, data)); s {
			mutatedScanned++
		}
	}
	// The generator must make enough valid files to mean something.
	if valid < rounds/10 || mutatedScanned < rounds/100 {
		t.Errorf("of %d random files %d valid (%d read by the fast path), %d broken copies read", rounds, valid, scanned, mutatedScanned)
	}
	t.Logf("of %d random files %d valid (%d read by the fast path), %d broken copies read", rounds, valid, scanned, mutatedScanned)
}

// FuzzScanKeysFile checks the fast path against encoding/json on any input:
// the same records, or scanKeysFile leaves the file to decodeKeysFile
// (which then finds the same records or the error).
func FuzzScanKeysFile(f *testing.F) {
	for _, s := range keysFileSeeds {
		f.Add([]byte(s))
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 50 {
		data, _ := randomKeysFile(r)
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkScanAgrees(t, data)
		set, err := parseKeysFile(data)
		if want, wantErr := decodeKeysFile(data, new(recordAlloc)); (err == nil) != (wantErr == nil) ||
			err != nil && err.Error() != wantErr.Error() || set != nil && set.len() != want.len() {
			t.Fatalf("parseKeysFile = %v, %v; decodeKeysFile = %v, %v", set, err, want, wantErr)
		}
	})
}

// Keys that set nothing rare share one keyRare, keys that differ only in
// plan, quota or disabled share one per combination, and every record still
// answers its own placeholders.
func TestKeyRecordSharing(t *testing.T) {
	data := []byte(`{"keys": [
		{"id": "a", "hash": "` + hash1 + `"},
		{"id": "b", "hash": "` + hash2 + `"},
		{"id": "c", "hash": "` + hash3 + `", "plan": "pro"},
		{"id": "d", "hash": "` + hash4 + `", "plan": "pro"},
		{"id": "e", "hash": "` + hash5 + `", "plan": "pro", "quota": "10/day"},
		{"id": "f", "hash": "` + hash6 + `", "plan": "pro", "name": "Eff", "owner": "o", "metadata": {"tier": "gold"}},
		{"id": "g", "hash": "` + hash7 + `", "rate": "10/1s"},
		{"id": "h", "hash": "` + sha256Hex("h") + `", "rate": "10/1s", "burst": 3}
	]}`)
	for _, parse := range []struct {
		name string
		fn   func([]byte) (*keySet, error)
	}{
		{"scan", func(data []byte) (*keySet, error) { return scanKeysFile(data, new(recordAlloc)), nil }},
		{"encoding/json", func(data []byte) (*keySet, error) { return decodeKeysFile(data, new(recordAlloc)) }},
	} {
		t.Run(parse.name, func(t *testing.T) {
			set, err := parse.fn(data)
			if err != nil || set == nil {
				t.Fatalf("parse: %v", err)
			}
			rec := make(map[string]*keyRecord)
			for _, r := range set.all() {
				rec[r.id] = r
			}
			if rec["a"].keyRare != noRare || rec["b"].keyRare != noRare || rec["g"].keyRare != noRare {
				t.Error("keys without rare settings do not share noRare")
			}
			if rec["c"].keyRare != rec["d"].keyRare || rec["c"].keyRare == noRare {
				t.Error("two keys of plan pro do not share their keyRare")
			}
			if rec["e"].keyRare == rec["c"].keyRare || rec["f"].keyRare == rec["c"].keyRare {
				t.Error("keys with other settings share plan pro's keyRare")
			}
			if rec["g"].policy.header != `"key";q=10;w=1` || rec["h"].limit.Burst != 3 || rec["g"].limit.Burst != 10 {
				t.Errorf("rates: g %+v %+v, h %+v", rec["g"].limit, rec["g"].policy, rec["h"].limit)
			}
			for _, tc := range []struct {
				id, placeholder string
				want            any
			}{
				{"a", "http.api_key.id", "a"},
				{"a", "http.auth.user.id", "a"},
				{"a", "http.api_key.name", ""},
				{"a", "http.api_key.plan", ""},
				{"a", "http.api_key.metadata.tier", ""},
				{"c", "http.api_key.plan", "pro"},
				{"d", "http.api_key.id", "d"},
				{"f", "http.api_key.name", "Eff"},
				{"f", "http.api_key.owner", "o"},
				{"f", "http.api_key.plan", "pro"},
				{"f", "http.api_key.metadata.tier", "gold"},
			} {
				if got, ok := rec[tc.id].provider(tc.placeholder); !ok || got != tc.want {
					t.Errorf("key %s: {%s} = %#v, %v; want %#v", tc.id, tc.placeholder, got, ok, tc.want)
				}
			}
		})
	}
}

// The records keep nothing of the file's buffer, which the caller may
// reuse: the fast path reads strings in place and must copy those it keeps.
func TestParseKeysFileKeepsNoView(t *testing.T) {
	data := []byte(`{"keys": [{"id": "a", "hash": "` + hash1 + `", "name": "Alpha", "owner": "team-a", "plan": "pro",
		"rate": "10/1s", "burst": 5, "quota": "100/day", "not_before": "2020-01-01T00:00:00Z", "expires": "2031-01-01T00:00:00Z",
		"metadata": {"tier": "gold"}, "allow_ips": ["10.0.0.0/8"], "allow_referrers": ["https://*.example.com/*"],
		"allow_methods": ["GET"], "allow_paths": ["/v1"]},
		{"id": "b", "hash": "` + hash2 + `", "plan": "pro"}]}`)
	want, err := decodeKeysFile(slices.Clone(data), new(recordAlloc))
	if err != nil {
		t.Fatal(err)
	}
	got := scanKeysFile(data, new(recordAlloc))
	if got == nil {
		t.Fatal("scanKeysFile did not read the file")
	}
	for i := range data {
		data[i] = 'x'
	}
	for d, w := range want.all() {
		if diff := recordDiff(got.get(&d), w); diff != "" {
			t.Errorf("after the buffer changed, key %q reads\n%s", w.id, diff)
		}
	}
}

// With the Go this module is built with, an id is boxed in place. If this
// fails, the runtime's layout of an interface changed: boxString then
// copies, which is correct but costs 16 bytes and an allocation per key.
func TestBoxStringInPlace(t *testing.T) {
	if !boxInPlace {
		t.Fatal("interface layout not recognised; boxString copies")
	}
	rec := newKeyRecord(&keyRecord{id: "alpha"})
	if s, ok := rec.idAny.(string); !ok || s != "alpha" || rec.idAny != any("alpha") {
		t.Fatalf("idAny = %#v", rec.idAny)
	}
	if allocs := testing.AllocsPerRun(100, func() { _ = boxString(&rec.id) }); allocs != 0 {
		t.Errorf("boxString allocates %v times", allocs)
	}
}

// plainWord agrees with a look at each byte: every byte value in every
// position among plain ones, and random words.
func TestPlainWord(t *testing.T) {
	plain := func(b byte) bool { return b >= 0x20 && b < 0x80 && b != '"' && b != '\\' }
	check := func(w [8]byte) {
		want := true
		for _, b := range w {
			want = want && plain(b)
		}
		if got := plainWord(binary.LittleEndian.Uint64(w[:])); got != want {
			t.Fatalf("plainWord(%q) = %v, want %v", w, got, want)
		}
	}
	for b := range 256 {
		for pos := range 8 {
			w := [8]byte{'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'}
			w[pos] = byte(b)
			check(w)
		}
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 100000 {
		var w [8]byte
		for i := range w {
			// Mostly plain, so that words of one odd byte are common.
			w[i] = byte(0x20 + r.IntN(0x60))
			if r.IntN(16) == 0 {
				w[i] = byte(r.IntN(256))
			}
		}
		check(w)
	}
}

// A new version of a file keeps the records of the keys that did not
// change, whichever path reads it, and counts the keys added and removed
// as diffSets (which compares every digest of the two sets) does.
func TestReparseKeysFileReuses(t *testing.T) {
	v1 := `{"keys": [
		{"id": "a", "hash": "` + hash1 + `"},
		{"id": "b", "hash": "` + hash2 + `", "plan": "pro"},
		{"id": "c", "hash": "` + hash3 + `", "name": "C", "metadata": {"tier": "gold"}, "allow_ips": ["10.0.0.0/8"]},
		{"id": "d", "hash": "` + hash4 + `", "rate": "10/1s"},
		{"id": "e", "hash": "` + hash5 + `"},
		{"id": "f", "hash": "` + hash6 + `"},
		{"id": "h", "hash": "` + sha256Hex("h") + `", "name": "H", "metadata": {"tier": "gold"}},
		{"id": "i", "hash": "` + sha256Hex("i") + `", "plan": "pro"}
	]}`
	v2 := `{"keys": [
		{"id": "a", "hash": "` + hash1 + `"},
		{"id": "b", "hash": "` + hash2 + `", "plan": "pro"},
		{"id": "c", "hash": "` + hash3 + `", "name": "C", "metadata": {"tier": "gold"}, "allow_ips": ["10.0.0.0/8"]},
		{"id": "d", "hash": "` + hash4 + `", "rate": "20/1s"},
		{"id": "e2", "hash": "` + hash5 + `"},
		{"id": "g", "hash": "` + hash7 + `"},
		{"id": "h", "hash": "` + sha256Hex("h") + `", "name": "H", "metadata": {"tier": "silver"}},
		{"id": "i", "hash": "` + sha256Hex("i") + `", "plan": "free"}
	]}`
	for _, tc := range []struct {
		name, data string
	}{
		{"scan", v2},
		// An escape in the top level leaves the file to encoding/json.
		{"encoding/json", strings.Replace(v2, `"keys"`, `"k\u0065ys"`, 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old, err := parseKeysFile([]byte(v1))
			if err != nil {
				t.Fatal(err)
			}
			set, added, removed, err := reparseKeysFile([]byte(tc.data), old)
			if err != nil {
				t.Fatal(err)
			}
			if wa, wr := diffSets(old, set); added != wa || removed != wr || added != 1 || removed != 1 {
				t.Errorf("added %d, removed %d; diffSets says %d, %d; want 1, 1", added, removed, wa, wr)
			}
			for _, h := range []string{hash1, hash2, hash3} {
				d := digestOf(t, h)
				if set.get(&d) != old.get(&d) {
					t.Errorf("key %s: a new record for an unchanged key", old.get(&d).id)
				}
			}
			for _, h := range []string{hash4, hash5, sha256Hex("h"), sha256Hex("i")} {
				d := digestOf(t, h)
				if set.get(&d) == old.get(&d) {
					t.Errorf("key %s: the old record kept for a changed key", set.get(&d).id)
				}
			}
			if d := digestOf(t, hash4); set.get(&d).limit.Count != 20 {
				t.Errorf("key d: limit %+v, want the new rate", set.get(&d).limit)
			}
			if set.gen == old.gen {
				t.Error("the new set has the old generation")
			}
			fresh, err := parseKeysFile([]byte(tc.data))
			if err != nil {
				t.Fatal(err)
			}
			for d, rec := range fresh.all() {
				if diff := recordDiff(set.get(&d), rec); diff != "" {
					t.Errorf("key %s read over the old set differs from a fresh read:\n%s", rec.id, diff)
				}
			}
		})
	}
}

// TestLargeLoadReleasesMemory checks that loading a large keys file, at
// start and on a reload, hands the load's garbage back to the operating
// system (in the background), and that a small one does not.
func TestLargeLoadReleasesMemory(t *testing.T) {
	slowPolling(t)
	t.Setenv("GOMEMLIMIT", "") // as unset, whatever the environment
	waitNoRelease(t)
	var calls atomic.Int64
	savedFree, savedLarge := freeOSMemory, largeKeySet
	freeOSMemory = func() { calls.Add(1) }
	largeKeySet = 2
	t.Cleanup(func() { freeOSMemory, largeKeySet = savedFree, savedLarge })
	waitCalls := func(want int64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for calls.Load() < want && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		for releasing.Load() && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond) // the release in flight has ended
		}
		if got := calls.Load(); got != want {
			t.Fatalf("memory released %d times, want %d", got, want)
		}
	}

	path := filepath.Join(t.TempDir(), "keys.json")
	writeKeysFile(t, path, keysJSON([2]string{"a", hash1}))
	kf := openTestKeysFile(t, path)
	waitCalls(0) // one key: below largeKeySet

	writeKeysFile(t, path, keysJSON([2]string{"a", hash1}, [2]string{"b", hash2}))
	if err := kf.check(); err != nil {
		t.Fatalf("check: %v", err)
	}
	waitCalls(1) // a reload to two keys

	large := filepath.Join(t.TempDir(), "large.json")
	writeKeysFile(t, large, keysJSON([2]string{"a", hash1}, [2]string{"b", hash2}, [2]string{"c", hash3}))
	openTestKeysFile(t, large)
	waitCalls(2) // a start with three keys
}

// diffSets counts the keys of cur not in old (added) and of old not in cur
// (removed), one lookup per key: the reference for the counts the loader
// keeps as it goes.
func diffSets(old, cur *keySet) (added, removed int) {
	for d := range cur.all() {
		if old.get(&d) == nil {
			added++
		}
	}
	for d := range old.all() {
		if cur.get(&d) == nil {
			removed++
		}
	}
	return added, removed
}

// TestReleasesCoalesce checks that loads during a release share the one
// release that starts after them, and that none goes without.
func TestReleasesCoalesce(t *testing.T) {
	t.Setenv("GOMEMLIMIT", "") // as unset, whatever the environment
	waitNoRelease(t)
	var calls atomic.Int64
	entered, proceed := make(chan struct{}, 10), make(chan struct{})
	savedFree, savedLarge := freeOSMemory, largeKeySet
	freeOSMemory = func() {
		calls.Add(1)
		entered <- struct{}{}
		<-proceed
	}
	largeKeySet = 1
	t.Cleanup(func() { freeOSMemory, largeKeySet = savedFree, savedLarge })
	waitEntered := func() {
		t.Helper()
		select {
		case <-entered:
		case <-time.After(5 * time.Second):
			t.Fatalf("no release started (%d so far)", calls.Load())
		}
	}

	releaseLoadGarbage(1)
	waitEntered() // the first release runs, and waits
	releaseLoadGarbage(1)
	releaseLoadGarbage(1) // two loads meanwhile: one release after it
	proceed <- struct{}{}
	waitEntered()
	proceed <- struct{}{}
	deadline := time.Now().Add(5 * time.Second)
	for releasing.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := calls.Load(); got != 2 {
		t.Fatalf("%d releases, want 2: the first, and one for both loads during it", got)
	}
	if releasing.Load() || releasePending.Load() {
		t.Fatal("a release is still running or pending")
	}
	releaseLoadGarbage(0) // below largeKeySet
	if releasePending.Load() || calls.Load() != 2 {
		t.Fatal("a small load asked for a release")
	}
	// With a memory limit set by the operator, memory is the runtime's:
	// no release. A limit set by the process itself (Caddy sets one from
	// the machine's memory) does not count.
	saved := debug.SetMemoryLimit(1 << 40)
	releaseLoadGarbage(1)
	debug.SetMemoryLimit(saved)
	waitEntered()
	proceed <- struct{}{}
	for releasing.Load() {
		time.Sleep(time.Millisecond)
	}
	if calls.Load() != 3 {
		t.Fatal("no release under a limit the process set itself")
	}
	t.Setenv("GOMEMLIMIT", "1TiB")
	releaseLoadGarbage(1)
	if releasePending.Load() || releasing.Load() || calls.Load() != 3 {
		t.Fatal("a load asked for a release under GOMEMLIMIT")
	}
	// GOMEMLIMIT=off is no limit.
	t.Setenv("GOMEMLIMIT", "off")
	releaseLoadGarbage(1)
	waitEntered()
	proceed <- struct{}{}
	waitNoRelease(t)
	if calls.Load() != 4 {
		t.Fatal("no release with GOMEMLIMIT=off")
	}
}

// waitNoRelease waits until no release of memory runs (one from an
// earlier test may still), before a test replaces freeOSMemory.
func waitNoRelease(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for releasing.Load() {
		if time.Now().After(deadline) {
			t.Fatal("a release of memory is still running")
		}
		time.Sleep(time.Millisecond)
	}
}

// checkRepeated only ever sees an entry that decoded, but its walk must
// not panic on anything: cut-off input stops it.
func TestCheckRepeatedCutOff(t *testing.T) {
	for _, in := range []string{`{"\`, `{"a`, `{"a":`, `{"a":"\`, `{"metadata":{"x":"1","x`, `{`, ``, `{"a":[{"b":"\`} {
		b := []byte(in)
		if err := checkRepeated(b[:len(b):len(b)]); err != nil { // nothing past the end to read
			t.Errorf("checkRepeated(%q) = %v, want nil (nothing complete is repeated)", in, err)
		}
	}
}
