package apikey

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// fuzzSources are the key sources of FuzzExtract, in bit order.
var fuzzSources = []KeySource{
	{Source: "bearer"},
	{Source: "header", Name: "X-API-Key"},
	{Source: "query", Name: "api_key"},
	{Source: "cookie", Name: "k"},
}

const (
	bitBearer = 1 << iota
	bitHeader
	bitQuery
	bitCookie
)

func fuzzHandler(t testing.TB) *Handler {
	t.Helper()
	h := new(Handler)
	for _, s := range fuzzSources {
		src, err := compileSource(s)
		if err != nil {
			t.Fatalf("compileSource(%+v): %v", s, err)
		}
		h.sources = append(h.sources, src)
	}
	return h
}

// headerValues splits a fuzz input into the values of a header, one a
// line, so that a request may carry a header more than once.
func headerValues(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// queryParts splits a raw query into its non-empty parts, as name and
// raw value.
func queryParts(rawQuery string) [][2]string {
	var out [][2]string
	for _, p := range strings.Split(rawQuery, "&") {
		if p == "" {
			continue
		}
		k, v, _ := strings.Cut(p, "=")
		out = append(out, [2]string{k, v})
	}
	return out
}

// isQueryKeyName reports whether a raw query parameter name names the key
// parameter, written as is or percent-encoded.
func isQueryKeyName(k string) bool {
	uk, err := url.QueryUnescape(k)
	return k == "api_key" || (err == nil && uk == "api_key")
}

// cookieParts returns the non-empty cookies of Cookie header lines.
func cookieParts(lines []string) []string {
	var out []string
	for _, line := range lines {
		for _, p := range strings.Split(line, ";") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

func cookieName(part string) string {
	name, _, _ := strings.Cut(part, "=")
	return strings.TrimSpace(name)
}

// isBearer reports whether an Authorization value uses the Bearer scheme,
// and returns what follows the scheme.
func isBearer(v string) (rest string, ok bool) {
	if len(v) < 6 || !strings.EqualFold(v[:6], "bearer") {
		return "", false
	}
	rest = v[6:]
	return rest, rest == "" || rest[0] == ' '
}

func FuzzExtract(f *testing.F) {
	long := strings.Repeat("k", maxKeyLen)
	seeds := []struct{ auth, xkey, query, cookie string }{
		{"", "", "", ""},
		{"Bearer abc123", "", "", ""},
		{"bearer   abc123  ", "", "", ""},
		{"BEARER abc123", "", "", ""},
		{"Bearer", "", "", ""},
		{"Bearer ", "", "", ""},
		{"Bearerabc", "", "", ""},
		{"Basic dXNlcjpwYXNz", "", "", ""},
		{"Basic dXNlcjpwYXNz\nBearer abc123", "", "", ""},
		{"Bearer abc123\nBearer abc124", "", "", ""},
		{"Bearer a b", "", "", ""},
		{"", "abc123", "", ""},
		{"", "abc123\nabc123", "", ""},
		{"", " abc123", "", ""},
		{"", "abc\x00", "", ""},
		{"", "ключ", "", ""},
		{"", long, "", ""},
		{"", long + "k", "", ""},
		{"", "", "api_key=abc123", ""},
		{"", "", "a=1&api_key=abc123&b=2", ""},
		{"", "", "api_key=abc123&api_key=abc123", ""},
		{"", "", "api_key=abc123&api_key=abc124", ""},
		{"", "", "api_key", ""},
		{"", "", "api_key=", ""},
		{"", "", "api_key=%zz", ""},
		{"", "", "api_key=a%2Bb+c", ""},
		{"", "", "api%5Fkey=abc123&x=%zz", ""},
		{"", "", "api+key=abc123", ""},
		{"", "", "&&api_key=abc123&&b=2&", ""},
		{"", "", "b=1;api_key=abc123", ""},
		{"", "", "", "k=abc123"},
		{"", "", "", `k="abc123"`},
		{"", "", "", `k="`},
		{"", "", "", "a=1; k=abc123; b=2"},
		{"", "", "", "a=1;k=abc123;;b=2"},
		{"", "", "", "k"},
		{"", "", "", "k="},
		{"", "", "", "K=abc123; kk=x; k =y"},
		{"", "", "", "a=1\nk=abc123; b=2\nc=3"},
		{"", "", "", "k=abc123\nk=abc124"},
		{"Bearer abc123", "abc123", "api_key=abc123", "k=abc123"},
		{"Bearer abc123", "abc124", "", ""},
		{"", "abc123", "api_key=abc124", ""},
		{"Basic x\nBearer abc123", "", "x=1&api_key=abc123", "z=9; k=abc123"},
	}
	for _, s := range seeds {
		f.Add(s.auth, s.xkey, s.query, s.cookie)
	}
	h := fuzzHandler(f)
	f.Fuzz(func(t *testing.T, auth, xkey, rawQuery, cookie string) {
		r := httptest.NewRequest(http.MethodGet, "http://example.com/path", nil)
		r.URL.RawQuery = rawQuery
		r.RequestURI = r.URL.RequestURI()
		if v := headerValues(auth); v != nil {
			r.Header["Authorization"] = v
		}
		if v := headerValues(xkey); v != nil {
			r.Header["X-Api-Key"] = v
		}
		if v := headerValues(cookie); v != nil {
			r.Header["Cookie"] = v
		}
		orig := r.Clone(r.Context())

		key, found, ok := h.extract(r)
		if !reflect.DeepEqual(r.Header, orig.Header) || r.URL.RawQuery != orig.URL.RawQuery {
			t.Fatalf("extract changed the request")
		}
		if !ok && key != "" {
			t.Fatalf("malformed request gave key %q", key)
		}
		if found >= 1<<len(fuzzSources) {
			t.Fatalf("found = %b names a source that does not exist", found)
		}
		if found == 0 {
			if key != "" || !ok {
				t.Fatalf("no source found, but key = %q, ok = %v", key, ok)
			}
		} else if ok && (!validKey(key) || len(key) > maxKeyLen) {
			t.Fatalf("key %q is not a valid key", key)
		}

		// Every source that carried a value is in found; when the
		// request is not malformed, a source in found carried the key.
		// A malformed request's values are removed all the same.
		var bearer []string
		for _, v := range r.Header["Authorization"] {
			if rest, ok := isBearer(v); ok {
				bearer = append(bearer, rest)
			}
		}
		checkSource(t, "bearer", ok, found&bitBearer != 0, len(bearer) > 0, func() bool {
			for _, rest := range bearer {
				if strings.Trim(rest, " ") != key {
					return false
				}
			}
			return true
		})
		xvals := r.Header["X-Api-Key"]
		checkSource(t, "header", ok, found&bitHeader != 0, len(xvals) > 0, func() bool {
			for _, v := range xvals {
				if v != key {
					return false
				}
			}
			return true
		})
		var qvals []string
		for _, p := range queryParts(rawQuery) {
			if isQueryKeyName(p[0]) {
				qvals = append(qvals, p[1])
			}
		}
		checkSource(t, "query", ok, found&bitQuery != 0, len(qvals) > 0, func() bool {
			for _, v := range qvals {
				if uv, err := url.QueryUnescape(v); err != nil || uv != key {
					return false
				}
			}
			return true
		})
		var cvals []string
		for _, p := range cookieParts(r.Header["Cookie"]) {
			if name, v, _ := strings.Cut(p, "="); strings.TrimSpace(name) == "k" {
				cvals = append(cvals, strings.TrimSpace(v))
			}
		}
		checkSource(t, "cookie", ok, found&bitCookie != 0, len(cvals) > 0, func() bool {
			for _, v := range cvals {
				if v != key && v != `"`+key+`"` {
					return false
				}
			}
			return true
		})

		// Taking the key out leaves a request without a key, and
		// everything else in place.
		c := r.Clone(r.Context())
		h.removeKey(c, found)
		key2, found2, ok2 := h.extract(c)
		if !ok2 || found2 != 0 || key2 != "" {
			t.Fatalf("after removeKey(%b): extract = %q, %b, %v; want nothing found", found, key2, found2, ok2)
		}
		if c.RequestURI != c.URL.RequestURI() {
			t.Errorf("RequestURI = %q, URL says %q", c.RequestURI, c.URL.RequestURI())
		}
		if found&bitBearer != 0 {
			var want []string
			for _, v := range r.Header["Authorization"] {
				if _, ok := isBearer(v); !ok {
					want = append(want, v)
				}
			}
			if got := c.Header["Authorization"]; !slices.Equal(got, want) {
				t.Errorf("Authorization after removal = %q, want %q", got, want)
			}
		} else if !slices.Equal(c.Header["Authorization"], r.Header["Authorization"]) {
			t.Errorf("Authorization changed though the key was not there")
		}
		if found&bitHeader != 0 {
			if _, present := c.Header["X-Api-Key"]; present {
				t.Errorf("X-Api-Key still present")
			}
		} else if !slices.Equal(c.Header["X-Api-Key"], r.Header["X-Api-Key"]) {
			t.Errorf("X-Api-Key changed though the key was not there")
		}
		if found&bitQuery != 0 {
			var want [][2]string
			for _, p := range queryParts(rawQuery) {
				if !isQueryKeyName(p[0]) {
					want = append(want, p)
				}
			}
			if got := queryParts(c.URL.RawQuery); !slices.Equal(got, want) {
				t.Errorf("query after removal = %q, want the parts %q", c.URL.RawQuery, want)
			}
		} else if c.URL.RawQuery != rawQuery {
			t.Errorf("query changed to %q though the key was not there", c.URL.RawQuery)
		}
		if found&bitCookie != 0 {
			var want []string
			for _, p := range cookieParts(r.Header["Cookie"]) {
				if cookieName(p) != "k" {
					want = append(want, p)
				}
			}
			if got := cookieParts(c.Header["Cookie"]); !slices.Equal(got, want) {
				t.Errorf("cookies after removal = %q, want %q", c.Header["Cookie"], want)
			}
			for _, line := range c.Header["Cookie"] {
				if line == "" {
					t.Errorf("an empty Cookie line was left")
				}
			}
		} else if !slices.Equal(c.Header["Cookie"], r.Header["Cookie"]) {
			t.Errorf("Cookie changed though the key was not there")
		}
	})
}

// checkSource checks one source's bit in found: set exactly when the
// source carried a value, and then, unless the request is malformed (ok
// false), every value it carried is the key.
func checkSource(t *testing.T, name string, ok, inFound, carried bool, allAreKey func() bool) {
	t.Helper()
	if inFound != carried {
		t.Fatalf("source %s: in found %v, but carried a value %v", name, inFound, carried)
	}
	if ok && inFound && !allAreKey() {
		t.Fatalf("source %s is in found but does not carry the key", name)
	}
}

// keysFileSeeds are valid keys files and each broken form.
var keysFileSeeds = []string{
	`{"keys": []}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "name": "A", "owner": "o", "metadata": {"plan": "pro"}, "rate": "10/1s", "burst": 5},
	  {"id": "b", "hash": "` + sha256Hex("b") + `", "rate": "off"},
	  {"id": "c", "hash": "` + sha256Hex("c") + `", "burst": 3},
	  {"id": "d", "hash": "` + sha256Hex("d") + `", "rate": "5000/d"}]}`,
	``,
	` `,
	`nope`,
	`[]`,
	`{}`,
	`{"key": []}`,
	`{"keys": [], "keys": []}`,
	`{"keys": {}}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "rat": "1/s"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "burst": "5"}]}`,
	`{"keys": [{"hash": "` + digestA + `"}]}`,
	`{"keys": [{"id": "a"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `"}, {"id": "a", "hash": "` + sha256Hex("x") + `"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `"}, {"id": "b", "hash": "` + digestA + `"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA[7:] + `"}]}`,
	`{"keys": [{"id": "a", "hash": "sha256:abc"}]}`,
	`{"keys": [{"id": "a", "hash": "sha256:` + strings.Repeat("z", 64) + `"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "rate": "fast"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "rate": "off", "burst": 1}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "burst": -1}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "metadata": {"a b": "c"}}]}`,
	`{"keys": [{"id": "` + strings.Repeat("i", 129) + `", "hash": "` + digestA + `"}]}`,
	`{"keys": [{"id": "a b", "hash": "` + digestA + `"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `"}]} x`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `"}`,
	"{\"keys\": [\n {\"id\": \"a\",\n \"hash\": 1}]}",
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "disabled": true, "disabled": false}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "Disabled": true, "disabled": false}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "id": "b"}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "metadata": {"t": "1", "t": "2"}}]}`,
	`{"keys": [{"id": "a", "hash": "` + digestA + `", "metadata": {"id": "1", "hash": "2", "T": "3", "t": "4"}}]}`,
}

func FuzzParseKeysFile(f *testing.F) {
	for _, s := range keysFileSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		set, err := parseKeysFile(data)
		if err != nil {
			if set != nil {
				t.Fatalf("error %q came with a set", err)
			}
			if err.Error() == "" {
				t.Fatalf("empty error message")
			}
			return
		}
		if set == nil {
			t.Fatal("no error and no set")
		}
		checkKeySet(t, set)
		if where := repeatedName(data); where != "" {
			t.Fatalf("file loaded with %s", where)
		}

		// The records, written back as a keys file, read the same.
		again, err := parseKeysFile(rewriteKeysFile(t, set))
		if err != nil {
			t.Fatalf("rewritten file does not parse: %v", err)
		}
		if again.len() != set.len() {
			t.Fatalf("rewritten file has %d keys, want %d", again.len(), set.len())
		}
		for d, rec := range set.all() {
			other := again.get(&d)
			if other == nil {
				t.Fatalf("key %q lost in the rewritten file", rec.id)
			}
			if !sameRecord(rec, other) {
				t.Fatalf("key %q reads back as %+v, want %+v", rec.id, other, rec)
			}
		}
		if again.gen == set.gen {
			t.Errorf("two sets share generation %d", set.gen)
		}
	})
}

// repeatedName finds, as the test's own judge, a name that appears twice in
// an entry of a keys file: in any case (as encoding/json matches a field)
// among the entry's own, exactly in an object within it. It says where, or
// returns "" if there is none or data is not JSON.
func repeatedName(data []byte) string {
	dec := json.NewDecoder(bytes.NewReader(data))
	type object struct {
		names []string
		key   bool // the next string token is a name
	}
	var stack []*object // nil for an array
	for {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		var top *object
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		switch tok {
		case json.Delim('{'):
			stack = append(stack, &object{key: true})
			continue
		case json.Delim('['):
			stack = append(stack, nil)
			continue
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
		default:
			if name, ok := tok.(string); ok && top != nil && top.key {
				// The file is an object, "keys" an array in it: an
				// entry's own names are at depth 3.
				for _, seen := range top.names {
					if len(stack) == 3 && strings.EqualFold(seen, name) || seen == name {
						return fmt.Sprintf("%q twice at depth %d", name, len(stack))
					}
				}
				top.names = append(top.names, name)
				top.key = false
				continue
			}
		}
		if len(stack) > 0 && stack[len(stack)-1] != nil {
			stack[len(stack)-1].key = true
		}
	}
}

func checkKeySet(t *testing.T, set *keySet) {
	t.Helper()
	seen := make(map[string]bool)
	for d, rec := range set.all() {
		if err := checkID(rec.id); err != nil {
			t.Fatalf("record id %q: %v", rec.id, err)
		}
		if seen[rec.id] {
			t.Fatalf("id %q twice", rec.id)
		}
		seen[rec.id] = true
		if d != rec.digest {
			t.Fatalf("key %q is filed under another digest", rec.id)
		}
		for k := range rec.metadata {
			if !validMetadataName(k) {
				t.Fatalf("key %q has metadata field %q", rec.id, k)
			}
		}
		if rec.idAny != rec.id || rec.provider == nil {
			t.Fatalf("key %q is not finished", rec.id)
		}
		switch rec.limitMode {
		case limitOwn:
			l := rec.limit
			if l.Count < 1 || l.Count > ratelimit.MaxCount || l.Burst < 1 || l.Burst > ratelimit.MaxCount ||
				l.Period <= 0 || l.Interval() <= 0 || rec.burst != 0 {
				t.Fatalf("key %q: bad own limit %+v, burst %d", rec.id, l, rec.burst)
			}
			if want := policyValue("key", l); rec.policy != want {
				t.Fatalf("key %q: policy %+v, want %+v", rec.id, rec.policy, want)
			}
		case limitOff:
			if !rec.limit.IsZero() || rec.burst != 0 || rec.policy != (policy{}) {
				t.Fatalf("key %q: rate off but limit %+v, burst %d, policy %+v", rec.id, rec.limit, rec.burst, rec.policy)
			}
		case limitInherit:
			if !rec.limit.IsZero() || rec.policy != (policy{}) || (rec.burst != 0 && ratelimit.ValidateBurst(rec.burst) != nil) {
				t.Fatalf("key %q: inherits but limit %+v, burst %d, policy %+v", rec.id, rec.limit, rec.burst, rec.policy)
			}
		default:
			t.Fatalf("key %q: limit mode %d", rec.id, rec.limitMode)
		}
	}
}

// rewriteKeysFile writes a key set as a keys file.
func rewriteKeysFile(t *testing.T, set *keySet) []byte {
	t.Helper()
	entries := []keyFileEntry{}
	for _, rec := range set.all() {
		e := keyFileEntry{
			ID:       rec.id,
			Hash:     "sha256:" + hex.EncodeToString(rec.digest[:]),
			Name:     rec.name,
			Owner:    rec.owner,
			Metadata: rec.metadata,
		}
		if rec.burst != 0 {
			e.Burst = &rec.burst
		}
		switch rec.limitMode {
		case limitOwn:
			e.Rate = fmt.Sprintf("%d/%s", rec.limit.Count, rec.limit.Period)
			e.Burst = &rec.limit.Burst
		case limitOff:
			e.Rate = "off"
		}
		entries = append(entries, e)
	}
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(map[string]any{"keys": entries}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func sameRecord(a, b *keyRecord) bool {
	return a.id == b.id && a.name == b.name && a.owner == b.owner && a.digest == b.digest &&
		reflect.DeepEqual(a.metadata, b.metadata) && a.limitMode == b.limitMode &&
		a.limit == b.limit && a.policy == b.policy && a.burst == b.burst
}

func FuzzParseRate(f *testing.F) {
	for _, s := range []string{
		"600/1m", "10/s", "10/1s", "5000/1h", "1/d", "7/2d", "1/366d", "1/367d", "1000000000/1s",
		"1000000001/1s", "1000000000/1ms", "3/1.5s", "10/.5s", "10/0.5s", "1/1h30m", "2/µs", "1/1ns",
		"10", "0/1m", "x/1m", "-1/1m", "+5/1m", "10/0s", "10/-1m", "10/+1m", "10/", "/1m", "10/m/s",
		"10/1e2d", "10/NaNd", "10/Infd", "10/1x", "10/1.5", "10/ 1m", " 10/1m",
	} {
		f.Add(s, int64(0))
	}
	// A burst far larger than the count, in a long period.
	f.Add("1/1h", int64(10_000_000))
	f.Add("1/366d", int64(ratelimit.MaxCount))
	f.Add("600/1m", int64(50))

	f.Fuzz(func(t *testing.T, s string, burst int64) {
		lim, err := ratelimit.ParseRate(s)
		if err != nil {
			if prefix := fmt.Sprintf("rate %q: ", s); !strings.HasPrefix(err.Error(), prefix) {
				t.Fatalf("error %q does not start with %q", err, prefix)
			}
			if !lim.IsZero() {
				t.Fatalf("error %q came with limit %+v", err, lim)
			}
			return
		}
		if lim.Count < 1 || lim.Count > ratelimit.MaxCount {
			t.Fatalf("%q: count %d out of range", s, lim.Count)
		}
		if lim.Period < time.Millisecond || lim.Period > 366*24*time.Hour || lim.Interval() <= 0 {
			t.Fatalf("%q: period %v, interval %v", s, lim.Period, lim.Interval())
		}
		if lim.Burst != lim.Count {
			t.Fatalf("%q: burst %d, want the count %d", s, lim.Burst, lim.Count)
		}
		// A duration Go can read means what Go reads.
		_, durStr, _ := strings.Cut(s, "/")
		if d, err := time.ParseDuration(durStr); err == nil && d != lim.Period {
			t.Fatalf("%q: period %v, but %q is %v", s, lim.Period, durStr, d)
		}

		// As the Caddyfile and keys files allow, a burst of its own.
		if burst != 0 {
			if ratelimit.ValidateBurst(burst) != nil {
				return
			}
			lim.Burst = burst
		}
		checkBurst(t, lim)
	})
}

// checkBurst checks that a key never seen is admitted its first request,
// never more than Burst requests at one instant, and, when the burst is
// worth at most a year of allowance, exactly Burst requests and then
// again once RetryAfter has passed.
func checkBurst(t *testing.T, lim ratelimit.Limit) {
	t.Helper()
	const now = int64(1000 * time.Second)
	tat, d := lim.Decide(0, now)
	if !d.Allowed {
		t.Fatalf("%v: the first request of a new key was denied: %+v", lim, d)
	}
	if lim.Burst > 1000 {
		return
	}
	exact := lim.Burst <= int64(366*24*time.Hour)/int64(lim.Interval())
	admitted := int64(1)
	for ; admitted <= lim.Burst; admitted++ {
		next, d := lim.Decide(tat, now)
		if !d.Allowed {
			break
		}
		tat = next
		if exact && d.Remaining != lim.Burst-admitted-1 {
			t.Fatalf("%v: request %d: remaining %d, want %d", lim, admitted+1, d.Remaining, lim.Burst-admitted-1)
		}
	}
	if admitted > lim.Burst {
		t.Fatalf("%v: admitted %d requests at one instant", lim, admitted)
	}
	if !exact {
		return
	}
	if admitted != lim.Burst {
		t.Fatalf("%v: admitted %d requests at one instant, want %d", lim, admitted, lim.Burst)
	}
	tat2, d := lim.Decide(tat, now)
	if d.Allowed {
		t.Fatalf("%v: request %d at the same instant was allowed", lim, lim.Burst+1)
	}
	if tat2 != tat || d.Remaining != 0 || d.RetryAfter <= 0 || d.RetryAfter > lim.Interval() || d.Reset <= 0 {
		t.Fatalf("%v: denial %+v, tat %d -> %d", lim, d, tat, tat2)
	}
	if _, d := lim.Decide(tat, now+int64(d.RetryAfter)); !d.Allowed {
		t.Fatalf("%v: denied again after waiting RetryAfter: %+v", lim, d)
	}
}
