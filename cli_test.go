package apikey

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/keystile/caddy-apikey/internal/keyformat"
	"github.com/keystile/caddy-apikey/internal/testutil"
)

// These tests run the api-key subcommands in process, as cobra would from
// the command line, each on a fresh command so that no flag value carries
// over from one run to the next.

// cliRun runs c with args and stdin and returns what it wrote to its
// standard output and error, and its error (a non-nil error is exit
// status 1).
func cliRun(t *testing.T, c *cobra.Command, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	c.SetArgs(args)
	c.SetOut(&out)
	c.SetErr(&errOut)
	c.SetIn(strings.NewReader(stdin))
	err = c.Execute()
	return out.String(), errOut.String(), err
}

// cliHash is the keys-file form of the digest of key, computed here rather
// than by the code under test.
func cliHash(key string) string {
	sum := sha256.Sum256([]byte(key))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// cliEntries returns the raw bytes of each entry of a keys file, exactly
// as they are in data: json.RawMessage keeps a value's bytes.
func cliEntries(t *testing.T, data []byte) []json.RawMessage {
	t.Helper()
	var f struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatalf("keys file is not JSON: %v\n%s", err, data)
	}
	return f.Keys
}

// cliMembers decodes one entry into its members, each kept as raw bytes.
func cliMembers(t *testing.T, raw []byte) map[string]string {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("entry is not a JSON object: %v\n%s", err, raw)
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = string(v)
	}
	return out
}

// cliWrite writes a file and backdates it, so that a rewrite with the same
// bytes would still show in its mtime.
func cliWrite(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o640); err != nil {
		t.Fatal(err)
	}
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
}

// cliSnapshot is a file's bytes and mtime, to show it was left alone.
type cliSnapshot struct {
	data  []byte
	mtime time.Time
}

func cliSnap(t *testing.T, path string) cliSnapshot {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return cliSnapshot{data: data, mtime: fi.ModTime()}
}

func (s cliSnapshot) assertUnchanged(t *testing.T, path string) {
	t.Helper()
	now := cliSnap(t, path)
	if !bytes.Equal(now.data, s.data) {
		t.Errorf("%s changed:\n%s\nwant:\n%s", path, now.data, s.data)
	}
	if !now.mtime.Equal(s.mtime) {
		t.Errorf("%s mtime changed from %v to %v: it was rewritten", path, s.mtime, now.mtime)
	}
	cliNoTempFiles(t, filepath.Dir(path))
}

// cliNoTempFiles fails if an edit left a temporary file in dir.
func cliNoTempFiles(t *testing.T, dir string) {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, ".*tmp*"))
	if err != nil {
		t.Fatal(err)
	}
	if len(names) > 0 {
		t.Errorf("temporary files left behind: %q", names)
	}
}

// cliLoad parses the keys file at path as the server does.
func cliLoad(t *testing.T, path string) *keySet {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	set, err := parseKeysFile(data)
	if err != nil {
		t.Fatalf("the server cannot load %s: %v\n%s", path, err, data)
	}
	return set
}

// cliRecord returns the record with id from set, failing if it is not
// there.
func cliRecord(t *testing.T, set *keySet, id string) *keyRecord {
	t.Helper()
	for _, rec := range set.all() {
		if rec.id == id {
			return rec
		}
	}
	t.Fatalf("no key with id %q among %d", id, set.len())
	return nil
}

// cliGenerated splits the output of generate into the key and the record.
func cliGenerated(t *testing.T, stdout string) (key string, rec map[string]string, raw string) {
	t.Helper()
	lines := strings.Split(stdout, "\n")
	if len(lines) != 3 || lines[2] != "" {
		t.Fatalf("generate printed %d lines, want exactly 2 (key, record):\n%s", len(lines)-1, stdout)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(lines[1]), &m); err != nil {
		t.Fatalf("second line is not a JSON record: %v\n%s", err, lines[1])
	}
	rec = make(map[string]string, len(m))
	for k, v := range m {
		s, ok := v.(string)
		if !ok {
			t.Errorf("record member %q = %v, want a string", k, v)
		}
		rec[k] = s
	}
	return lines[0], rec, lines[1]
}

func TestCLIGenerate(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		prefix string            // the prefix the key must carry
		want   map[string]string // the record, less hash (and id when idRe is set)
		idRe   string            // the form of a default id
	}{
		{
			name:   "all fields",
			args:   []string{"--prefix", "sk_live", "--id", "acme-prod", "--name", "Acme production", "--owner", "acme", "--plan", "gold", "--expires", "2031-06-01T12:00:00Z"},
			prefix: "sk_live",
			want:   map[string]string{"id": "acme-prod", "name": "Acme production", "owner": "acme", "plan": "gold", "expires": "2031-06-01T12:00:00Z"},
		},
		{
			name:   "expires with an offset is the same instant in UTC",
			args:   []string{"--prefix", "pk", "--id", "k1", "--expires", "2031-06-01T14:00:00+02:00"},
			prefix: "pk",
			want:   map[string]string{"id": "k1", "expires": "2031-06-01T12:00:00Z"},
		},
		{
			name:   "defaults",
			args:   nil,
			prefix: "key",
			want:   map[string]string{},
			idRe:   `^key-[0-9a-f]{8}$`,
		},
		{
			name:   "default id from the owner",
			args:   []string{"--prefix", "sk", "--owner", "acme"},
			prefix: "sk",
			want:   map[string]string{"owner": "acme"},
			idRe:   `^acme-[0-9a-f]{8}$`,
		},
		{
			name:   "default id from the prefix when the owner cannot be an id",
			args:   []string{"--prefix", "sk", "--owner", "Acme Inc"},
			prefix: "sk",
			want:   map[string]string{"owner": "Acme Inc"},
			idRe:   `^sk-[0-9a-f]{8}$`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, err := cliRun(t, generateCommand(), "", tt.args...)
			if err != nil {
				t.Fatalf("generate %q: %v (stderr %q)", tt.args, err, stderr)
			}
			key, rec, _ := cliGenerated(t, stdout)
			if !keyformat.Check(key, tt.prefix) {
				t.Errorf("key %q does not pass keyformat.Check with prefix %q", key, tt.prefix)
			}
			if rec["hash"] != cliHash(key) {
				t.Errorf("record hash = %q, want sha256 of the printed key %q", rec["hash"], cliHash(key))
			}
			want := maps.Clone(tt.want)
			want["hash"] = cliHash(key)
			if tt.idRe != "" {
				if !regexp.MustCompile(tt.idRe).MatchString(rec["id"]) {
					t.Errorf("default id %q does not match %s", rec["id"], tt.idRe)
				}
				want["id"] = rec["id"]
			}
			if !maps.Equal(rec, want) {
				t.Errorf("record = %v, want %v", rec, want)
			}
			if strings.Contains(stderr, key) {
				t.Errorf("stderr has the key: %q", stderr)
			}
			// The record must be one the server accepts.
			if _, err := parseKeysFile([]byte(`{"keys": [` + strings.Split(stdout, "\n")[1] + `]}`)); err != nil {
				t.Errorf("the server rejects the record: %v", err)
			}
		})
	}
}

func TestCLIGenerateKeysAreDistinct(t *testing.T) {
	seen := make(map[string]bool)
	for i := range 20 {
		stdout, _, err := cliRun(t, generateCommand(), "", "--prefix", "sk")
		if err != nil {
			t.Fatal(err)
		}
		key, rec, _ := cliGenerated(t, stdout)
		if seen[key] || seen[rec["id"]] {
			t.Fatalf("run %d repeated a key or an id: %q %q", i, key, rec["id"])
		}
		seen[key], seen[rec["id"]] = true, true
	}
}

func TestCLIGenerateExpiresDuration(t *testing.T) {
	tests := []struct {
		expires string
		ahead   time.Duration
	}{
		{"48h", 48 * time.Hour},
		{"90d", 90 * 24 * time.Hour},
		{"1h30m", 90 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.expires, func(t *testing.T) {
			before := time.Now()
			stdout, stderr, err := cliRun(t, generateCommand(), "", "--id", "k", "--expires", tt.expires)
			after := time.Now()
			if err != nil {
				t.Fatalf("generate: %v (stderr %q)", err, stderr)
			}
			_, rec, _ := cliGenerated(t, stdout)
			got, err := time.Parse(time.RFC3339, rec["expires"])
			if err != nil {
				t.Fatalf("expires %q is not RFC 3339: %v", rec["expires"], err)
			}
			if !strings.HasSuffix(rec["expires"], "Z") {
				t.Errorf("expires %q is not in UTC", rec["expires"])
			}
			// The value is cut to whole seconds.
			lo, hi := before.Add(tt.ahead).Truncate(time.Second), after.Add(tt.ahead)
			if got.Before(lo) || got.After(hi) {
				t.Errorf("expires = %s, want between %s and %s", got, lo.UTC(), hi.UTC())
			}
		})
	}
}

func TestCLIGenerateErrors(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		errHas string
	}{
		{name: "expires not a time", args: []string{"--expires", "next tuesday"}, errHas: `--expires "next tuesday"`},
		{name: "expires negative", args: []string{"--expires", "-48h"}, errHas: `--expires "-48h"`},
		{name: "expires zero", args: []string{"--expires", "0s"}, errHas: `--expires "0s"`},
		{name: "expires date only", args: []string{"--expires", "2031-06-01"}, errHas: `--expires "2031-06-01"`},
		{name: "prefix with a space", args: []string{"--prefix", "s k"}, errHas: `prefix "s k"`},
		{name: "prefix ends with underscore", args: []string{"--prefix", "sk_"}, errHas: `prefix "sk_"`},
		{name: "prefix empty", args: []string{"--prefix", ""}, errHas: `prefix ""`},
		{name: "prefix too long", args: []string{"--prefix", strings.Repeat("p", 33)}, errHas: "at most 32"},
		{name: "id with a space", args: []string{"--id", "a b"}, errHas: `"id"`},
		{name: "id with a quote", args: []string{"--id", `a"b`}, errHas: `"id"`},
		{name: "id too long", args: []string{"--id", strings.Repeat("i", 129)}, errHas: "128"},
		{name: "plan not a plan name", args: []string{"--id", "k", "--plan", "gold plan"}, errHas: `plan name "gold plan"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "keys.json")
			args := append([]string{"--keys-file", path}, tt.args...)
			stdout, stderr, err := cliRun(t, generateCommand(), "", args...)
			if err == nil {
				t.Fatalf("generate %q succeeded, want an error; stdout:\n%s", tt.args, stdout)
			}
			if !strings.Contains(err.Error(), tt.errHas) {
				t.Errorf("error %q does not contain %q", err, tt.errHas)
			}
			if stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
			if !strings.Contains(stderr, "Error: ") {
				t.Errorf("stderr = %q, want the error", stderr)
			}
			if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("keys file exists after a failed generate (stat: %v)", err)
			}
			if names, _ := os.ReadDir(dir); len(names) != 0 {
				t.Errorf("files left in %s: %v", dir, names)
			}
		})
	}
}

// Odd but valid spacing, which an edit must keep for the entries it is not
// about.
var (
	cliHashA = cliHash("alpha-key")
	cliHashB = cliHash("bravo-key")
	cliHashC = cliHash("charlie-key")

	cliEntryA = `{ "id" : "alpha",   "hash":"` + cliHashA + `",` + "\n\t\t" + `"name": "Alpha" , "owner":"acme"}`
	cliEntryB = `{"id":"bravo","hash":"` + cliHashB + `","plan":"gold"}`
	cliEntryC = "{\n  \"id\": \"charlie\",\n  \"hash\": \"" + cliHashC + "\"\n}"
)

// cliOddFile is a keys file of entries with odd spacing between them too.
func cliOddFile(entries ...string) string {
	var b strings.Builder
	b.WriteString("{ \"keys\" :[\n")
	for i, e := range entries {
		if i > 0 {
			b.WriteString(" ,\n\n\t")
		}
		b.WriteString(e)
	}
	b.WriteString("  ]\n}\n")
	return b.String()
}

func TestCLIGenerateKeysFile(t *testing.T) {
	t.Run("new file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "keys.json")
		stdout, stderr, err := cliRun(t, generateCommand(), "",
			"--keys-file", path, "--prefix", "sk", "--id", "new1", "--owner", "acme", "--plan", "gold")
		if err != nil {
			t.Fatalf("generate: %v (stderr %q)", err, stderr)
		}
		key, _, rawRec := cliGenerated(t, stdout)
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		entries := cliEntries(t, data)
		if len(entries) != 1 || string(entries[0]) != rawRec {
			t.Errorf("file entries = %q, want just the printed record %q", entries, rawRec)
		}
		if bytes.Contains(data, []byte(key)) {
			t.Errorf("the file holds the key:\n%s", data)
		}
		if strings.Contains(stderr, key) {
			t.Errorf("stderr holds the key: %q", stderr)
		}
		if want := fmt.Sprintf("added key %q to %s\n", "new1", path); stderr != want {
			t.Errorf("stderr = %q, want %q", stderr, want)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if mode := fi.Mode().Perm(); mode != 0o600 {
			t.Errorf("new file mode = %#o, want 0600", mode)
		}
		rec := cliRecord(t, cliLoad(t, path), "new1")
		if want := sha256.Sum256([]byte(key)); rec.digest != want {
			t.Errorf("record digest is not sha256 of the key")
		}
		if rec.owner != "acme" || rec.plan != "gold" || rec.disabled {
			t.Errorf("record owner %q plan %q disabled %v, want acme, gold, false", rec.owner, rec.plan, rec.disabled)
		}
		cliNoTempFiles(t, filepath.Dir(path))
	})

	t.Run("append keeps the other entries", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "keys.json")
		cliWrite(t, path, cliOddFile(cliEntryA, cliEntryB, cliEntryC))
		if got := cliEntries(t, cliSnap(t, path).data); !slices.EqualFunc(got, []string{cliEntryA, cliEntryB, cliEntryC},
			func(a json.RawMessage, b string) bool { return string(a) == b }) {
			t.Fatalf("test fixture: entries read back as %q", got)
		}
		stdout, stderr, err := cliRun(t, generateCommand(), "",
			"--keys-file", path, "--prefix", "sk", "--id", "delta", "--expires", "2031-01-01T00:00:00Z")
		if err != nil {
			t.Fatalf("generate: %v (stderr %q)", err, stderr)
		}
		key, _, rawRec := cliGenerated(t, stdout)
		after := cliSnap(t, path)
		got := cliEntries(t, after.data)
		want := []string{cliEntryA, cliEntryB, cliEntryC, rawRec}
		if len(got) != len(want) {
			t.Fatalf("file has %d entries, want %d:\n%s", len(got), len(want), after.data)
		}
		for i := range want {
			if string(got[i]) != want[i] {
				t.Errorf("entry %d = %q, want byte for byte %q", i, got[i], want[i])
			}
		}
		if bytes.Contains(after.data, []byte(key)) || strings.Contains(stderr, key) {
			t.Errorf("the key is in the file or on stderr")
		}
		// The mode of the file it replaced is kept.
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if mode := fi.Mode().Perm(); mode != 0o640 {
			t.Errorf("mode after append = %#o, want the original 0640", mode)
		}
		set := cliLoad(t, path)
		if set.len() != 4 {
			t.Errorf("server loads %d keys, want 4", set.len())
		}
		rec := cliRecord(t, set, "delta")
		if want := sha256.Sum256([]byte(key)); rec.digest != want {
			t.Errorf("record digest is not sha256 of the key")
		}
		if want := time.Date(2031, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano(); rec.expires != want {
			t.Errorf("record expires = %d, want %d", rec.expires, want)
		}
		cliNoTempFiles(t, filepath.Dir(path))
	})

	t.Run("duplicate id is refused", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "keys.json")
		cliWrite(t, path, cliOddFile(cliEntryA, cliEntryB))
		before := cliSnap(t, path)
		stdout, stderr, err := cliRun(t, generateCommand(), "", "--keys-file", path, "--id", "bravo")
		if err == nil {
			t.Fatalf("generate with an id in the file succeeded; stdout:\n%s", stdout)
		}
		if !strings.Contains(err.Error(), `"bravo"`) || !strings.Contains(err.Error(), "already") || !strings.HasPrefix(err.Error(), path+": ") {
			t.Errorf("error %q does not say, after the file, that id \"bravo\" is already there", err)
		}
		if n := strings.Count(err.Error(), "adding key"); n != 1 {
			t.Errorf("error %q says %q %d times, want once", err, "adding key", n)
		}
		if stdout != "" {
			t.Errorf("stdout = %q, want nothing (no key for a record that was not added)", stdout)
		}
		if strings.Contains(stderr, "added") {
			t.Errorf("stderr claims an addition: %q", stderr)
		}
		before.assertUnchanged(t, path)
	})

	t.Run("file the editor cannot read is left alone", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "keys.json")
		cliWrite(t, path, `{"keys": [`+cliEntryA+`,]}`)
		before := cliSnap(t, path)
		stdout, _, err := cliRun(t, generateCommand(), "", "--keys-file", path, "--id", "x")
		if err == nil {
			t.Fatalf("generate into a broken file succeeded; stdout:\n%s", stdout)
		}
		if !strings.Contains(err.Error(), path) {
			t.Errorf("error %q does not name the file", err)
		}
		if stdout != "" {
			t.Errorf("stdout = %q, want nothing", stdout)
		}
		before.assertUnchanged(t, path)
	})
}

func TestCLIHash(t *testing.T) {
	abc := "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
	if got := cliHash("abc"); got != abc {
		t.Fatalf("test fixture: sha256(abc) = %s", got)
	}
	tests := []struct {
		name  string
		stdin string
		want  string // "" for an error
	}{
		{"newline", "abc\n", abc},
		{"crlf", "abc\r\n", abc},
		{"no newline", "abc", abc},
		{"generated key", "sk_AbC123\n", cliHash("sk_AbC123")},
		{"empty", "", ""},
		{"only a newline", "\n", ""},
		{"two lines", "abc\ndef\n", ""},
		{"two newlines", "abc\n\n", ""},
		{"control byte", "ab\x01c\n", ""},
		{"tab", "ab\tc\n", ""},
		{"space", "ab c\n", ""},
		{"non-ASCII", "abcé\n", ""},
		{"longer than a key", strings.Repeat("k", 513) + "\n", ""},
		{"longest key", strings.Repeat("k", 512) + "\r\n", cliHash(strings.Repeat("k", 512))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, err := cliRun(t, hashCommand(), tt.stdin)
			if tt.want == "" {
				if err == nil {
					t.Fatalf("hash of %q succeeded with %q, want an error", tt.stdin, stdout)
				}
				if stdout != "" {
					t.Errorf("stdout = %q, want nothing", stdout)
				}
				if !strings.Contains(stderr, "no key on stdin") {
					t.Errorf("stderr = %q, want the error", stderr)
				}
				return
			}
			if err != nil {
				t.Fatalf("hash of %q: %v", tt.stdin, err)
			}
			if stdout != tt.want+"\n" {
				t.Errorf("stdout = %q, want %q", stdout, tt.want+"\n")
			}
			if stderr != "" {
				t.Errorf("stderr = %q, want nothing", stderr)
			}
		})
	}
}

// cliTable checks list's output, a line of columns per row of want, and
// returns its lines.
func cliTable(t *testing.T, stdout string, want [][]string) []string {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
	if len(lines) != len(want) {
		t.Fatalf("list printed %d lines, want %d:\n%s", len(lines), len(want), stdout)
	}
	for i, line := range lines {
		if got := strings.Fields(line); !slices.Equal(got, want[i]) {
			t.Errorf("line %d = %q, want columns %q", i, line, want[i])
		}
	}
	return lines
}

// An edit is saved only if the server would load the edited file: else
// the command would report an edit that does not take, and a key meant to
// be disabled would keep working. Nothing is written then.
func TestCLIEditsOnlyFilesTheServerLoads(t *testing.T) {
	for _, tc := range []struct {
		name, keys string
		cmd        func() *cobra.Command
		args       []string
	}{
		{
			name: "disable, a metadata name twice in the entry",
			keys: `{"keys": [{"id": "a", "hash": "` + cliHash("a") + `", "metadata": {"x": "1", "x": "2"}}]}`,
			cmd:  func() *cobra.Command { return stateCommand("disable") }, args: []string{"--id", "a"},
		},
		{
			name: "disable, a duplicate hash in other entries",
			keys: `{"keys": [{"id": "a", "hash": "` + cliHash("a") + `"}, {"id": "b", "hash": "` + cliHash("b") + `"}, {"id": "c", "hash": "` + cliHash("b") + `"}]}`,
			cmd:  func() *cobra.Command { return stateCommand("disable") }, args: []string{"--id", "a"},
		},
		{
			name: "remove, a bad rate left in another entry",
			keys: `{"keys": [{"id": "a", "hash": "` + cliHash("a") + `"}, {"id": "b", "hash": "` + cliHash("b") + `", "rate": "lots"}]}`,
			cmd:  func() *cobra.Command { return stateCommand("remove") }, args: []string{"--id", "a"},
		},
		{
			name: "generate into a file with a bad entry",
			keys: `{"keys": [{"id": "b", "hash": "` + cliHash("b") + `", "expires": "soon"}]}`,
			cmd:  generateCommand, args: []string{"--id", "new"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			cliWrite(t, path, tc.keys)
			before := cliSnap(t, path)
			stdout, stderr, err := cliRun(t, tc.cmd(), "", append([]string{"--keys-file", path}, tc.args...)...)
			if err == nil || !strings.Contains(err.Error(), "nothing written: the server would not load the file") {
				t.Fatalf("error = %v, want one saying the server would not load the file", err)
			}
			if stdout != "" || strings.Contains(stderr, "added") || strings.Contains(stderr, "disabled key") || strings.Contains(stderr, "removed key") {
				t.Errorf("stdout %q, stderr %q: want no key and no claim of an edit", stdout, stderr)
			}
			before.assertUnchanged(t, path)
		})
	}
	// Removing the entry that keeps the file out is an edit that takes.
	t.Run("remove the bad entry", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "keys.json")
		cliWrite(t, path, `{"keys": [{"id": "a", "hash": "`+cliHash("a")+`"}, {"id": "b", "hash": "`+cliHash("b")+`", "rate": "lots"}]}`)
		if _, stderr, err := cliRun(t, stateCommand("remove"), "", "--keys-file", path, "--id", "b"); err != nil {
			t.Fatalf("remove: %v (stderr %q)", err, stderr)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if set, err := parseKeysFile(data); err != nil || set.len() != 1 {
			t.Errorf("after the removal the file loads: %v, with %v keys; want 1", err, set)
		}
	})
}

func TestCLIList(t *testing.T) {
	hashes := []string{cliHash("k-act"), cliHash("k-dis"), cliHash("k-exp"), cliHash("k-nyv"), cliHash("k-fut")}
	path := filepath.Join(t.TempDir(), "keys.json")
	cliWrite(t, path, `{"keys": [
  {"id": "act", "hash": "`+hashes[0]+`", "name": "Active", "owner": "acme", "plan": "gold"},
  {"id": "dis", "hash": "`+hashes[1]+`", "disabled": true, "name": "Off"},
  {"id": "exp", "hash": "`+hashes[2]+`", "expires": "2001-02-03T04:05:06Z", "owner": "old"},
  {"id": "nyv", "hash": "`+hashes[3]+`", "not_before": "2098-01-01T00:00:00Z", "expires": "2099-06-01T00:00:00Z", "plan": "silver"},
  {"id": "fut", "hash": "`+hashes[4]+`", "expires": "2099-01-01T00:00:00Z"}
]}`)
	before := cliSnap(t, path)
	stdout, stderr, err := cliRun(t, listCommand(), "", "--keys-file", path)
	if err != nil {
		t.Fatalf("list: %v (stderr %q)", err, stderr)
	}
	want := [][]string{
		{"ID", "NAME", "OWNER", "PLAN", "EXPIRES", "STATE"},
		{"act", "Active", "acme", "gold", "-", "active"},
		{"dis", "Off", "-", "-", "-", "disabled"},
		{"exp", "-", "old", "-", "2001-02-03T04:05:06Z", "expired"},
		{"nyv", "-", "-", "silver", "2099-06-01T00:00:00Z", "not_yet_valid"},
		{"fut", "-", "-", "-", "2099-01-01T00:00:00Z", "active"},
	}
	lines := cliTable(t, stdout, want)
	// The columns line up: each starts where the header's does.
	for _, col := range []string{"NAME", "STATE"} {
		at := strings.Index(lines[0], col)
		for i, line := range lines[1:] {
			if at >= len(line) || line[at-1] != ' ' || line[at] == ' ' {
				t.Errorf("line %d: column %s does not start at byte %d: %q", i+1, col, at, line)
			}
		}
	}
	if strings.Contains(stdout, "sha256:") {
		t.Errorf("list shows a hash:\n%s", stdout)
	}
	for _, h := range hashes {
		hexPart := strings.TrimPrefix(h, "sha256:")
		if strings.Contains(stdout, hexPart) || strings.Contains(stdout, hexPart[:16]) {
			t.Errorf("list shows (part of) hash %s:\n%s", h, stdout)
		}
	}
	before.assertUnchanged(t, path)

	// Entries the server would refuse are listed as invalid, and the file
	// with them: an unknown field, a later duplicate id or hash, a field
	// twice. list says on stderr that the server will not load it.
	t.Run("invalid entries", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "keys.json")
		cliWrite(t, path, `{"keys": [
  {"id": "a", "hash": "`+cliHash("a")+`", "rat": "1/s"},
  {"id": "b", "hash": "`+cliHash("b")+`", "name": "Bee"},
  {"id": "b", "hash": "`+cliHash("b2")+`"},
  {"id": "c", "hash": "`+cliHash("b")+`"},
  {"id": "d", "hash": "`+cliHash("d")+`", "expires": "soon"},
  {"hash": "`+cliHash("e")+`"},
  {"id": "f", "hash": "`+cliHash("f")+`", "disabled": true, "disabled": false}
]}`)
		stdout, stderr, err := cliRun(t, listCommand(), "", "--keys-file", path)
		if err != nil {
			t.Fatalf("list: %v (stderr %q)", err, stderr)
		}
		want := [][]string{
			{"ID", "NAME", "OWNER", "PLAN", "EXPIRES", "STATE"},
			{"a", "-", "-", "-", "-", "invalid"},
			{"b", "Bee", "-", "-", "-", "active"},
			{"b", "-", "-", "-", "-", "invalid"},
			{"c", "-", "-", "-", "-", "invalid"},
			{"d", "-", "-", "-", "soon", "invalid"},
			{"(keys[5])", "-", "-", "-", "-", "invalid"},
			{"f", "-", "-", "-", "-", "invalid"},
		}
		cliTable(t, stdout, want)
		if !strings.Contains(stderr, "6 invalid entries") || !strings.Contains(stderr, "will not load "+path) {
			t.Errorf("stderr = %q, want it to say 6 invalid entries and that the server will not load the file", stderr)
		}
	})
	// Faults of the file as a whole keep every key out as well.
	for _, tc := range []struct{ name, keys, says string }{
		{"a top-level name in another case", `{"KEYS": [{"id": "a", "hash": "` + cliHash("a") + `"}]}`, `unknown top-level field "KEYS"`},
		{"keys twice", `{"keys": [{"id": "a", "hash": "` + cliHash("a") + `"}], "keys": [{"id": "b", "hash": "` + cliHash("b") + `"}]}`, `"keys" appears twice`},
		{"data after the file", `{"keys": [{"id": "a", "hash": "` + cliHash("a") + `"}]} more`, "after"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			cliWrite(t, path, tc.keys)
			_, stderr, err := cliRun(t, listCommand(), "", "--keys-file", path)
			if err != nil {
				t.Fatalf("list: %v", err)
			}
			if !strings.Contains(stderr, "the server will not load "+path) || !strings.Contains(stderr, tc.says) {
				t.Errorf("stderr = %q, want it to say the server will not load the file, and %q", stderr, tc.says)
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "nope.json")
		stdout, _, err := cliRun(t, listCommand(), "", "--keys-file", missing)
		if err == nil || !strings.Contains(err.Error(), missing) {
			t.Errorf("list of a missing file: error %v, want one naming %s", err, missing)
		}
		if stdout != "" {
			t.Errorf("stdout = %q, want nothing", stdout)
		}
	})
	t.Run("no keys-file flag", func(t *testing.T) {
		if _, _, err := cliRun(t, listCommand(), ""); err == nil || !strings.Contains(err.Error(), "keys-file") {
			t.Errorf("list without --keys-file: error %v, want one about keys-file", err)
		}
	})
}

func TestCLIStateCommands(t *testing.T) {
	// bravo is disabled in the enable case's file, with the member in the
	// middle and spaced oddly.
	cliEntryBDisabled := `{"id":"bravo", "disabled" : true ,"hash":"` + cliHashB + `","plan":"gold"}`
	tests := []struct {
		verb     string
		entries  []string
		disabled bool // bravo's state afterwards
		removed  bool
		state    string // bravo's STATE in list afterwards
	}{
		{verb: "disable", entries: []string{cliEntryA, cliEntryB, cliEntryC}, disabled: true, state: "disabled"},
		{verb: "enable", entries: []string{cliEntryA, cliEntryBDisabled, cliEntryC}, disabled: false, state: "active"},
		{verb: "remove", entries: []string{cliEntryA, cliEntryB, cliEntryC}, removed: true},
	}
	for _, tt := range tests {
		t.Run(tt.verb, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			cliWrite(t, path, cliOddFile(tt.entries...))
			origB := cliMembers(t, []byte(tt.entries[1]))

			_, stderr, err := cliRun(t, stateCommand(tt.verb), "", "--keys-file", path, "--id", "bravo")
			if err != nil {
				t.Fatalf("%s: %v (stderr %q)", tt.verb, err, stderr)
			}
			got := cliEntries(t, cliSnap(t, path).data)
			if tt.removed {
				if len(got) != 2 || string(got[0]) != cliEntryA || string(got[1]) != cliEntryC {
					t.Errorf("entries after remove = %q, want alpha and charlie byte for byte", got)
				}
			} else {
				if len(got) != 3 {
					t.Fatalf("%d entries after %s, want 3", len(got), tt.verb)
				}
				if string(got[0]) != cliEntryA || string(got[2]) != cliEntryC {
					t.Errorf("%s changed another entry:\n%s\n%s\nwant\n%s\n%s", tt.verb, got[0], got[2], cliEntryA, cliEntryC)
				}
				members := cliMembers(t, got[1])
				if d, ok := members["disabled"]; tt.disabled && d != "true" || !tt.disabled && ok {
					t.Errorf("bravo after %s = %s, want disabled member %v", tt.verb, got[1], tt.disabled)
				}
				// Every other member of the edited entry is as it was.
				delete(members, "disabled")
				delete(origB, "disabled")
				if !maps.Equal(members, origB) {
					t.Errorf("bravo's other members after %s = %v, want %v", tt.verb, members, origB)
				}
			}

			set := cliLoad(t, path)
			if tt.removed {
				if set.len() != 2 {
					t.Errorf("server loads %d keys after remove, want 2", set.len())
				}
				for _, rec := range set.all() {
					if rec.id == "bravo" {
						t.Errorf("bravo is still loaded after remove")
					}
				}
			} else {
				if rec := cliRecord(t, set, "bravo"); rec.disabled != tt.disabled {
					t.Errorf("bravo disabled = %v after %s, want %v", rec.disabled, tt.verb, tt.disabled)
				}
				for _, id := range []string{"alpha", "charlie"} {
					if cliRecord(t, set, id).disabled {
						t.Errorf("%s is disabled after %s of bravo", id, tt.verb)
					}
				}
			}
			cliNoTempFiles(t, filepath.Dir(path))

			list, _, err := cliRun(t, listCommand(), "", "--keys-file", path)
			if err != nil {
				t.Fatalf("list: %v", err)
			}
			var bravoRow []string
			for _, line := range strings.Split(list, "\n") {
				if f := strings.Fields(line); len(f) > 0 && f[0] == "bravo" {
					bravoRow = f
				}
			}
			switch {
			case tt.removed && bravoRow != nil:
				t.Errorf("list still shows bravo after remove:\n%s", list)
			case !tt.removed && (bravoRow == nil || bravoRow[len(bravoRow)-1] != tt.state):
				t.Errorf("list row of bravo = %q, want state %s:\n%s", bravoRow, tt.state, list)
			}
		})
	}
}

// TestCLIStateReport checks what disable, enable and remove say they did.
func TestCLIStateReport(t *testing.T) {
	for verb, done := range map[string]string{"disable": "disabled", "enable": "enabled", "remove": "removed"} {
		t.Run(verb, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			cliWrite(t, path, cliOddFile(cliEntryA, cliEntryB))
			stdout, stderr, err := cliRun(t, stateCommand(verb), "", "--keys-file", path, "--id", "bravo")
			if err != nil {
				t.Fatalf("%s: %v", verb, err)
			}
			if stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
			if want := fmt.Sprintf("%s key %q in %s\n", done, "bravo", path); stderr != want {
				t.Errorf("stderr = %q, want %q", stderr, want)
			}
		})
	}
}

func TestCLIStateCommandErrors(t *testing.T) {
	for _, verb := range []string{"disable", "enable", "remove"} {
		t.Run(verb+" unknown id", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			cliWrite(t, path, cliOddFile(cliEntryA, cliEntryB, cliEntryC))
			before := cliSnap(t, path)
			stdout, stderr, err := cliRun(t, stateCommand(verb), "", "--keys-file", path, "--id", "zulu")
			if err == nil {
				t.Fatalf("%s of an unknown id succeeded", verb)
			}
			if !strings.Contains(err.Error(), `"zulu"`) || !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name the id and the file", err)
			}
			if stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
			if !strings.Contains(stderr, "Error: ") {
				t.Errorf("stderr = %q, want the error", stderr)
			}
			before.assertUnchanged(t, path)
		})
		// The server refuses the entry; an edit that set one of the
		// two, or went by either, would not do what it says.
		t.Run(verb+" field twice", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			twice := `{"id": "bravo", "hash": "` + cliHashB + `", "disabled": true, "disabled": false}`
			cliWrite(t, path, cliOddFile(cliEntryA, twice, cliEntryC))
			before := cliSnap(t, path)
			_, _, err := cliRun(t, stateCommand(verb), "", "--keys-file", path, "--id", "bravo")
			if want := `loading keys file ` + path + `: keys[1] (id "bravo"): "disabled" appears twice`; err == nil || err.Error() != want {
				t.Errorf("%s: error %v, want %s", verb, err, want)
			}
			before.assertUnchanged(t, path)
		})
		t.Run(verb+" missing file", func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "keys.json")
			if _, _, err := cliRun(t, stateCommand(verb), "", "--keys-file", path, "--id", "alpha"); err == nil {
				t.Fatalf("%s on a missing file succeeded", verb)
			}
			if names, _ := os.ReadDir(dir); len(names) != 0 {
				t.Errorf("%s on a missing file left files: %v", verb, names)
			}
		})
		t.Run(verb+" no id", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			cliWrite(t, path, cliOddFile(cliEntryA))
			before := cliSnap(t, path)
			if _, _, err := cliRun(t, stateCommand(verb), "", "--keys-file", path); err == nil || !strings.Contains(err.Error(), "id") {
				t.Errorf("%s without --id: error %v, want one about id", verb, err)
			}
			before.assertUnchanged(t, path)
		})
	}
}

// TestCLINamedPipe runs every command that reads a keys file on a named
// pipe: each refuses it at once, rather than wait for a writer for ever.
func TestCLINamedPipe(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "keys.json")
	mkfifo(t, fifo)
	for _, tc := range []struct {
		name string
		cmd  func() *cobra.Command
		args []string
	}{
		{"list", listCommand, nil},
		{"check", checkCommand, nil},
		{"disable", func() *cobra.Command { return stateCommand("disable") }, []string{"--id", "a"}},
		{"remove", func() *cobra.Command { return stateCommand("remove") }, []string{"--id", "a"}},
		{"generate", generateCommand, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			testutil.Within(t, tc.name, func() {
				_, _, err = cliRun(t, tc.cmd(), "", append([]string{"--keys-file", fifo}, tc.args...)...)
			})
			if err == nil || !strings.Contains(err.Error(), "keys file "+fifo+": not a regular file (a named pipe)") {
				t.Errorf("%s: error %v, want one saying that %s is a named pipe", tc.name, err, fifo)
			}
		})
	}
	if fi, err := os.Lstat(fifo); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("%s is now %v, %v; want the named pipe left alone", fifo, fi, err)
	}
	cliNoTempFiles(t, dir)
}

// cliCaddyfile writes a Caddyfile whose api_key handler reads keysFile and
// defines the plan gold.
func cliCaddyfile(t *testing.T, keysFile string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "Caddyfile")
	body := fmt.Sprintf(":0 {\n\tapi_key {\n\t\tkeys_file %s\n\t\tplan gold {\n\t\t\trate 10/1m\n\t\t}\n\t}\n\trespond ok\n}\n", keysFile)
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestCLICheck(t *testing.T) {
	h := func(s string) string { return cliHash(s) }
	tests := []struct {
		name string
		keys string
		// config, when set, makes a Caddyfile with the plan gold whose
		// keys_file is the keys file ("same") or another one ("other").
		config   string
		problems []string // each a line of output: prefix, then text it must contain
		errHas   string   // for an error without a problem list
	}{
		{
			name: "good file",
			keys: `{"keys": [{"id": "a", "hash": "` + h("a") + `", "plan": "gold"}, {"id": "b", "hash": "` + h("b") + `", "expires": "2099-01-01T00:00:00Z"}]}`,
		},
		{
			name: "every problem reported",
			keys: `{"keys": [
  {"id": "good", "hash": "` + h("good") + `"},
  {"id": "badhash", "hash": "sha256:zz"},
  {"id": "duph", "hash": "` + h("good") + `"},
  {"id": "unknown", "hash": "` + h("u") + `", "colour": "red"},
  {"id": "badrate", "hash": "` + h("r") + `", "rate": "lots"},
  {"id": "badexp", "hash": "` + h("e") + `", "expires": "tomorrow"}
]}`,
			problems: []string{
				`keys[1] (id "badhash"): ` + "\x00" + `"hash"`,
				`keys[2] (id "duph"): ` + "\x00" + `duplicate hash (same as keys[0], id "good")`,
				`keys[3] (id "unknown"): ` + "\x00" + `"colour"`,
				`keys[4] (id "badrate"): ` + "\x00" + `"rate"`,
				`keys[5] (id "badexp"): ` + "\x00" + `"expires"`,
			},
		},
		{
			name: "every problem reported with a duplicate id",
			keys: `{"keys": [
  {"id": "good", "hash": "` + h("good") + `"},
  {"id": "badhash", "hash": "sha256:zz"},
  {"id": "dup", "hash": "` + h("d1") + `"},
  {"id": "dup", "hash": "` + h("d2") + `"},
  {"id": "unknown", "hash": "` + h("u") + `", "colour": "red"},
  {"id": "badrate", "hash": "` + h("r") + `", "rate": "lots"},
  {"id": "badexp", "hash": "` + h("e") + `", "expires": "tomorrow"}
]}`,
			problems: []string{
				`keys[1] (id "badhash"): ` + "\x00" + `"hash"`,
				`keys[3] (id "dup"): ` + "\x00" + `duplicate id`,
				`keys[4] (id "unknown"): ` + "\x00" + `"colour"`,
				`keys[5] (id "badrate"): ` + "\x00" + `"rate"`,
				`keys[6] (id "badexp"): ` + "\x00" + `"expires"`,
			},
		},
		{
			// An entry the server refuses still has its id and hash:
			// a later entry may not share them either.
			name: "duplicates of broken entries",
			keys: `{"keys": [
  {"id": "a", "hash": "` + h("a") + `", "rat": "1/s"},
  {"id": "b", "hash": "` + h("a") + `"},
  {"id": "a", "hash": "sha256:zz"},
  {"id": "c", "hash": "` + h("c") + `", "rate": 5}
]}`,
			problems: []string{
				`keys[0] (id "a"): ` + "\x00" + `unknown field "rat"`,
				`keys[1] (id "b"): ` + "\x00" + `duplicate hash (same as keys[0], id "a")`,
				`keys[2] (id "a"): ` + "\x00" + `"hash"`,
				`keys[2] (id "a"): ` + "\x00" + `duplicate id (also keys[0])`,
				`keys[3] (id "c"): ` + "\x00" + `"rate"`,
			},
		},
		{
			// encoding/json alone would read each as its last one.
			name: "fields twice",
			keys: `{"keys": [
  {"id": "good", "hash": "` + h("good") + `"},
  {"id": "c", "hash": "` + h("c") + `", "disabled": true, "disabled": false},
  {"id": "x", "hash": "` + h("x") + `", "expires": "2001-01-01T00:00:00Z", "Expires": "2099-01-01T00:00:00Z"},
  {"id": "m", "hash": "` + h("m") + `", "metadata": {"tier": "gold", "tier": "free"}}
]}`,
			problems: []string{
				`keys[1] (id "c"): ` + "\x00" + `"disabled" appears twice`,
				`keys[2] (id "x"): ` + "\x00" + `"expires" appears twice (as "expires" and "Expires")`,
				`keys[3] (id "m"): ` + "\x00" + `metadata field "tier" appears twice`,
			},
		},
		{
			name:   "plans of the config",
			config: "same",
			keys: `{"keys": [
  {"id": "s", "hash": "` + h("s") + `", "plan": "silver"},
  {"id": "g", "hash": "` + h("g") + `", "plan": "gold"},
  {"id": "n", "hash": "` + h("n") + `"}
]}`,
			problems: []string{`keys[0] (id "s"): ` + "\x00" + `unknown plan "silver"`},
		},
		{
			name:   "known plans only",
			config: "same",
			keys:   `{"keys": [{"id": "g", "hash": "` + h("g") + `", "plan": "gold"}]}`,
		},
		{
			name:   "config without the keys file",
			config: "other",
			keys:   `{"keys": [{"id": "g", "hash": "` + h("g") + `", "plan": "gold"}]}`,
			errHas: "no api_key handler with keys_file",
		},
		{
			name:   "not a keys file",
			keys:   `{"keys": [`,
			errHas: "unexpected end of file",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			cliWrite(t, path, tt.keys)
			before := cliSnap(t, path)
			args := []string{"--keys-file", path}
			switch tt.config {
			case "same":
				args = append(args, "--config", cliCaddyfile(t, path))
			case "other":
				args = append(args, "--config", cliCaddyfile(t, filepath.Join(t.TempDir(), "other.json")))
			}
			stdout, stderr, err := cliRun(t, checkCommand(), "", args...)
			defer before.assertUnchanged(t, path)

			switch {
			case tt.errHas != "":
				if err == nil || !strings.Contains(err.Error(), tt.errHas) {
					t.Errorf("check: error %v, want one containing %q", err, tt.errHas)
				}
				if strings.Contains(stdout, "no problems") {
					t.Errorf("stdout says no problems:\n%s", stdout)
				}
			case len(tt.problems) == 0:
				if err != nil {
					t.Fatalf("check of a good file: %v\nstdout:\n%s", err, stdout)
				}
				n := strings.Count(tt.keys, `"id"`)
				if want := fmt.Sprintf("%s: %d keys, no problems\n", path, n); stdout != want {
					t.Errorf("stdout = %q, want %q", stdout, want)
				}
			default:
				if err == nil {
					t.Fatalf("check of a file with problems succeeded; stdout:\n%s", stdout)
				}
				want := fmt.Sprintf("%s: %d problems", path, len(tt.problems))
				if len(tt.problems) == 1 {
					want = path + ": 1 problem"
				}
				if err.Error() != want {
					t.Errorf("error = %q, want %q", err, want)
				}
				if !strings.Contains(stderr, err.Error()) {
					t.Errorf("stderr = %q, want the error", stderr)
				}
				var lines []string
				if stdout != "" {
					lines = strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
				}
				if len(lines) != len(tt.problems) {
					t.Errorf("check printed %d lines, want %d problems:\n%s", len(lines), len(tt.problems), stdout)
				}
				for i, p := range tt.problems {
					prefix, has, _ := strings.Cut(p, "\x00")
					if i >= len(lines) {
						t.Errorf("problem %d missing: want a line %q...%q", i, prefix, has)
						continue
					}
					if !strings.HasPrefix(lines[i], prefix) || !strings.Contains(lines[i], has) {
						t.Errorf("line %d = %q, want one starting %q and containing %q", i, lines[i], prefix, has)
					}
				}
			}
			for _, id := range []string{"good", "g", "n"} {
				if strings.Contains(stdout, fmt.Sprintf("(id %q)", id)) {
					t.Errorf("check reports a problem with the good key %q:\n%s", id, stdout)
				}
			}
		})
	}
}
