package report

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"
	"unicode/utf8"
)

// Lines as a real Caddy (quickstart example, format filter deleting
// X-Api-Key) wrote them: a key admitted, a key missing, a key over its
// rate limit.
const (
	realOK      = `{"level":"info","ts":1795761994.4843233,"logger":"http.log.access.log0","msg":"handled request","request":{"remote_ip":"127.0.0.1","remote_port":"39368","client_ip":"127.0.0.1","proto":"HTTP/1.1","method":"GET","host":"127.0.0.1:18391","uri":"/a?x=1","headers":{"Accept":["*/*"],"User-Agent":["curl/7.88.1"]}},"bytes_read":0,"user_id":"acme-prod","duration":0.000257243,"size":23,"status":200,"resp_headers":{"Server":["Caddy"],"Ratelimit-Policy":["\"default\";q=60;w=60"],"Ratelimit":["\"default\";r=9;t=1"],"Content-Type":["text/plain; charset=utf-8"]},"api_key":{"id":"acme-prod","outcome":"ok"}}`
	realMissing = `{"level":"info","ts":1795761994.5146017,"logger":"http.log.access.log0","msg":"handled request","request":{"remote_ip":"127.0.0.1","remote_port":"39382","client_ip":"127.0.0.1","proto":"HTTP/1.1","method":"GET","host":"127.0.0.1:18391","uri":"/b","headers":{"User-Agent":["curl/7.88.1"],"Accept":["*/*"]}},"bytes_read":0,"user_id":"","duration":0.000144621,"size":12,"status":401,"resp_headers":{"Server":["Caddy"],"Www-Authenticate":["Bearer realm=\"api\""],"Content-Type":["text/plain; charset=utf-8"]},"api_key":{"outcome":"missing"}}`
	realLimited = `{"level":"info","ts":1795761994.6478531,"logger":"http.log.access.log0","msg":"handled request","request":{"remote_ip":"127.0.0.1","remote_port":"39432","client_ip":"127.0.0.1","proto":"HTTP/1.1","method":"GET","host":"127.0.0.1:18391","uri":"/g","headers":{"Accept":["*/*"],"User-Agent":["curl/7.88.1"]}},"bytes_read":0,"user_id":"globex-trial","duration":0.000118222,"size":17,"status":429,"resp_headers":{"Retry-After":["20"],"Content-Type":["text/plain; charset=utf-8"],"Server":["Caddy"],"Ratelimit-Policy":["\"key\";q=3;w=60"],"Ratelimit":["\"key\";r=0;t=60"]},"api_key":{"id":"globex-trial","outcome":"rate_limited"}}`
	// Caddy's default logger (no logger name) and another named logger.
	realStartup = `{"level":"info","ts":1795761992.5488117,"msg":"using config from file","file":"Caddyfile"}`
	realTLS     = `{"level":"warn","ts":1795761992.55,"logger":"http.auto_https","msg":"server is listening only on the HTTP port, so no automatic HTTPS will be applied to this server","server_name":"srv0","http_port":80}`
)

// logLine is an access-log line to make: the fields the report reads.
type logLine struct {
	ts       float64 // unix seconds
	status   int
	size     int64
	duration float64 // seconds
	uri      string
	id, plan string
	outcome  string
}

// String writes l in the shape of a real Caddy access-log line.
func (l logLine) String() string {
	apiKey := `"outcome":` + q(l.outcome)
	if l.plan != "" {
		apiKey = `"plan":` + q(l.plan) + "," + apiKey
	}
	if l.id != "" {
		apiKey = `"id":` + q(l.id) + "," + apiKey
	}
	f := func(x float64) string { return strconv.FormatFloat(x, 'f', -1, 64) }
	return `{"level":"info","ts":` + f(l.ts) + `,"logger":"http.log.access.log0","msg":"handled request",` +
		`"request":{"remote_ip":"203.0.113.9","remote_port":"51514","client_ip":"203.0.113.9","proto":"HTTP/2.0",` +
		`"method":"GET","host":"api.example.com","uri":` + q(l.uri) + `,"headers":{"Accept":["application/json"],` +
		`"User-Agent":["example-client/1.4 (+https://example.com)"],"Authorization":["REDACTED"],"Accept-Encoding":["gzip"]},` +
		`"tls":{"resumed":false,"version":772,"cipher_suite":4865,"proto":"h2","server_name":"api.example.com"}},` +
		`"bytes_read":0,"user_id":` + q(l.id) + `,"duration":` + f(l.duration) + `,"size":` + strconv.FormatInt(l.size, 10) +
		`,"status":` + strconv.Itoa(l.status) + `,"resp_headers":{"Server":["Caddy"],"Content-Type":["application/json"],` +
		`"Ratelimit-Policy":["\"default\";q=60;w=60"],"Ratelimit":["\"default\";r=59;t=1"]},"api_key":{` + apiKey + `}}`
}

// q quotes s as zap does: as JSON, without escaping <, > and &.
func q(s string) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	return strings.TrimSuffix(b.String(), "\n")
}

// t0 is 2026-03-01T12:00:00Z, when the made-up logs start.
var t0 = float64(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC).Unix())

// sampleLines is a made-up log of requests by three keys and none.
var sampleLines = []logLine{
	{ts: t0 + 0, status: 200, size: 100, duration: 0.010, uri: "/v1/items?page=1", id: "acme-prod", plan: "pro", outcome: "ok"},
	{ts: t0 + 1, status: 200, size: 300, duration: 0.020, uri: "/v1/items?page=2", id: "acme-prod", plan: "pro", outcome: "ok"},
	{ts: t0 + 2, status: 500, size: 50, duration: 1.5, uri: "/v1/orders", id: "acme-prod", plan: "pro", outcome: "ok"},
	{ts: t0 + 3, status: 403, size: 0, duration: 0.0001, uri: "/v1/admin", id: "acme-ci", plan: "free", outcome: "forbidden"},
	{ts: t0 + 4, status: 200, size: 1000, duration: 0.030, uri: "/v1/items", id: "acme-ci", plan: "free", outcome: "ok"},
	{ts: t0 + 5, status: 429, size: 0, duration: 0.0002, uri: "/v1/items", id: "globex-trial", outcome: "rate_limited"},
	{ts: t0 + 6, status: 200, size: 200, duration: 0.040, uri: "/v1/items", id: "globex-trial", outcome: "ok"},
	{ts: t0 + 7, status: 401, size: 0, duration: 0.0001, uri: "/v1/items?api_key=REDACTED", outcome: "invalid"},
	{ts: t0 + 8, status: 401, size: 0, duration: 0.0001, uri: "/", outcome: "missing"},
}

var sampleOwners = map[string]string{"acme-prod": "acme", "acme-ci": "acme", "globex-trial": ""}

func joinLines(lines []logLine) string {
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(l.String())
		b.WriteByte('\n')
	}
	return b.String()
}

// run reads logs into a new report with opts.
func run(t *testing.T, opts Options, logs ...string) *Report {
	t.Helper()
	r, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	for i, log := range logs {
		if err := r.Read(fmt.Sprintf("log%d", i), strings.NewReader(log)); err != nil {
			t.Fatalf("Read: %v", err)
		}
	}
	return r
}

// requests returns the requests of each group.
func requests(r *Report) map[string]int64 {
	m := make(map[string]int64)
	for _, row := range r.Rows() {
		m[row.Group] = row.Requests
	}
	return m
}

func TestParseLine(t *testing.T) {
	tests := []struct {
		name string
		line string
		kind lineKind
		want entry // checked for kindAccess: ts, status, size, duration, uri, keyID, plan
	}{
		{"real ok", realOK, kindAccess, entry{ts: 1795761994.4843233, hasTS: true, status: 200, size: 23,
			duration: 0.000257243, hasDur: true, uri: []byte("/a?x=1"), keyID: []byte("acme-prod")}},
		{"real missing", realMissing, kindAccess, entry{ts: 1795761994.5146017, hasTS: true, status: 401, size: 12,
			duration: 0.000144621, hasDur: true, uri: []byte("/b")}},
		{"real limited", realLimited + "\r\n", kindAccess, entry{ts: 1795761994.6478531, hasTS: true, status: 429, size: 17,
			duration: 0.000118222, hasDur: true, uri: []byte("/g"), keyID: []byte("globex-trial")}},
		{"plan and escapes", `{"logger":"http.log.access","msg":"handled request","status":201,"size":0,"request":{"uri":"/a\"b\u00e9?x"},"api_key":{"id":"k\/1","plan":"pro","outcome":"ok","restriction":null}}`,
			kindAccess, entry{status: 201, uri: []byte(`/a"bé?x`), keyID: []byte("k/1"), plan: []byte("pro")}},
		{"no logger name", `{"msg":"handled request","request":{},"status":204}`, kindAccess, entry{status: 204}},
		{"api_key null", `{"msg":"handled request","request":{"uri":"/"},"api_key":null,"status":200}`,
			kindAccess, entry{status: 200, uri: []byte("/")}},
		{"ts as RFC 3339, duration as string", `{"ts":"2026-03-01T12:00:00.5Z","msg":"handled request","request":{},"duration":"1.5ms"}`,
			kindAccess, entry{ts: t0 + 0.5, hasTS: true, duration: 0.0015, hasDur: true}},
		{"ts in milliseconds", `{"ts":1772366400500,"msg":"handled request","request":{}}`,
			kindAccess, entry{ts: t0 + 0.5, hasTS: true}},
		{"ts in nanoseconds", `{"ts":1772366400500000000,"msg":"handled request","request":{}}`,
			kindAccess, entry{ts: t0 + 0.5, hasTS: true}},
		{"ts in an unknown layout", `{"ts":"01/03/2026 12:00","msg":"handled request","request":{}}`, kindAccess, entry{}},
		{"exponent", `{"msg":"handled request","request":{},"status":2e2,"duration":1.5E-3}`,
			kindAccess, entry{status: 200, duration: 0.0015, hasDur: true}},

		{"default logger", realStartup, kindOther, entry{}},
		{"other logger", realTLS, kindOther, entry{}},
		{"error logger", `{"level":"error","logger":"http.log.error","msg":"handled request","request":{}}`, kindOther, entry{}},
		{"access logger, other msg", `{"logger":"http.log.access.log0","msg":"NOP","request":{}}`, kindOther, entry{}},
		{"similar logger name", `{"logger":"http.log.accessory","msg":"handled request","request":{}}`, kindOther, entry{}},

		{"empty", ``, kindInvalid, entry{}},
		{"text", `127.0.0.1 - - [01/Mar/2026:12:00:00 +0000] "GET / HTTP/1.1" 200 12`, kindInvalid, entry{}},
		{"array", `[1,2]`, kindInvalid, entry{}},
		{"not a log entry", `{"a":1}`, kindInvalid, entry{}},
		{"no request", `{"logger":"http.log.access","msg":"handled request","status":200}`, kindInvalid, entry{}},
		{"request not an object", `{"msg":"handled request","request":"/"}`, kindInvalid, entry{}},
		{"status a string", `{"msg":"handled request","request":{},"status":"200"}`, kindInvalid, entry{}},
		{"status a fraction", `{"msg":"handled request","request":{},"status":200.5}`, kindInvalid, entry{}},
		{"size negative", `{"msg":"handled request","request":{},"size":-1}`, kindInvalid, entry{}},
		{"msg a number", `{"msg":1,"request":{}}`, kindInvalid, entry{}},
		{"id a number", `{"msg":"handled request","request":{},"api_key":{"id":7}}`, kindInvalid, entry{}},
		{"truncated", realOK[:len(realOK)/2], kindInvalid, entry{}},
		{"trailing garbage", realOK + "x", kindInvalid, entry{}},
		{"two objects", realOK + realOK, kindInvalid, entry{}},
		{"bad escape", `{"msg":"handled request","request":{"uri":"/\x"}}`, kindInvalid, entry{}},
		{"raw control character", "{\"msg\":\"handled\trequest\"}", kindInvalid, entry{}},
		{"bad number", `{"msg":"handled request","request":{},"status":0200}`, kindInvalid, entry{}},
		{"bad literal", `{"msg":"handled request","request":{},"x":nul}`, kindInvalid, entry{}},
		{"missing comma", `{"msg":"handled request" "request":{}}`, kindInvalid, entry{}},
		{"trailing comma", `{"msg":"handled request","request":{},}`, kindInvalid, entry{}},
		{"too deep", `{"msg":"handled request","request":{},"x":` + strings.Repeat("[", 2000) + strings.Repeat("]", 2000) + `}`, kindInvalid, entry{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var e entry
			kind := parseLine([]byte(tt.line), &e)
			if kind != tt.kind {
				t.Fatalf("kind = %d, want %d", kind, tt.kind)
			}
			if valid := json.Valid([]byte(tt.line)); kind != kindInvalid && !valid {
				t.Errorf("parsed a line that encoding/json finds invalid")
			}
			if kind != kindAccess {
				return
			}
			w := tt.want
			if e.hasTS != w.hasTS || math.Abs(e.ts-w.ts) > 1e-6 {
				t.Errorf("ts = %v %v, want %v %v", e.ts, e.hasTS, w.ts, w.hasTS)
			}
			if e.hasDur != w.hasDur || math.Abs(e.duration-w.duration) > 1e-15 {
				t.Errorf("duration = %v %v, want %v %v", e.duration, e.hasDur, w.duration, w.hasDur)
			}
			if e.status != w.status || e.size != w.size {
				t.Errorf("status, size = %d, %d, want %d, %d", e.status, e.size, w.status, w.size)
			}
			if string(e.uri) != string(w.uri) || string(e.keyID) != string(w.keyID) || string(e.plan) != string(w.plan) {
				t.Errorf("uri, id, plan = %q, %q, %q, want %q, %q, %q", e.uri, e.keyID, e.plan, w.uri, w.keyID, w.plan)
			}
		})
	}
}

func TestParseFloat(t *testing.T) {
	for _, s := range []string{"0", "-0", "1", "200", "0.000257243", "1795761994.4843233", "1772366400500000000",
		"12345678901234567890", "1e3", "-2.5E-7", "0.1", "123456789.123456789", "9007199254740993", "1e400"} {
		t.Run(s, func(t *testing.T) {
			want, _ := strconv.ParseFloat(s, 64)
			got := parseFloat([]byte(s))
			if got != want && math.Abs(got-want) > 4*math.Abs(want)*0x1p-52 {
				t.Errorf("parseFloat(%s) = %v, want %v", s, got, want)
			}
		})
	}
}

// FuzzParseLine checks parseLine against encoding/json: a line it takes
// must be valid JSON and hold what encoding/json finds in it, and a line
// whose fields encoding/json finds missing or of the wrong type must be
// refused.
func FuzzParseLine(f *testing.F) {
	for _, s := range []string{realOK, realMissing, realLimited, realStartup, realTLS, sampleLines[0].String(),
		`{"msg":"handled request","request":{"uri":"/\u00e9"},"api_key":{"id":"a","plan":"b"},"status":2e2,"size":0,"ts":"2026-03-01T12:00:00Z","duration":"1s"}`,
		`{"msg":"handled request","request":{},"api_key":null}`, "{\"msg\":\"handled request\",\"request\":{\"uri\":\"/\xff\\ud800\"}}",
		`{"msg":"handled request","request":{"uri":"\ud83d\ude00\udc00\ud800\u0041"}}`, `{"m\u0073g":"handled request","request":{}}`,
		`{"msg":"handled request","request":{},"status":"200"}`, `[]`, `{`, `"x"`, ` {} `} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		var e entry
		kind := parseLine(line, &e)
		if !json.Valid(line) {
			if kind != kindInvalid {
				t.Fatalf("took a line that is not JSON: kind %d", kind)
			}
			return
		}
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.UseNumber()
		var v any
		if err := dec.Decode(&v); err != nil {
			t.Fatal(err)
		}
		want := referenceKind(v)
		if want == kindInvalid && kind != kindInvalid {
			t.Fatalf("kind = %d, want kindInvalid", kind)
		}
		if kind == kindInvalid {
			return // wrong types in a duplicate member, or nested too deep: stricter than needed
		}
		if kind != want {
			t.Fatalf("kind = %d, want %d", kind, want)
		}
		if kind != kindAccess {
			return
		}
		m := v.(map[string]any)
		req := m["request"].(map[string]any)
		if uri, _ := req["uri"].(string); uri != jsonText(e.uri) {
			t.Errorf("uri = %q, want %q", e.uri, uri)
		}
		ak, _ := m["api_key"].(map[string]any)
		if id, _ := ak["id"].(string); id != jsonText(e.keyID) {
			t.Errorf("id = %q, want %q", e.keyID, id)
		}
		if plan, _ := ak["plan"].(string); plan != jsonText(e.plan) {
			t.Errorf("plan = %q, want %q", e.plan, plan)
		}
		if n, ok := m["status"].(json.Number); ok {
			if f, _ := strconv.ParseFloat(string(n), 64); int(f) != e.status {
				t.Errorf("status = %d, want %v", e.status, n)
			}
		}
		if n, ok := m["size"].(json.Number); ok {
			if f, _ := strconv.ParseFloat(string(n), 64); int64(f) != e.size {
				t.Errorf("size = %d, want %v", e.size, n)
			}
		}
		if n, ok := m["duration"].(json.Number); ok {
			if f, _ := strconv.ParseFloat(string(n), 64); !e.hasDur || !closeTo(e.duration, f) {
				t.Errorf("duration = %v, want %v", e.duration, n)
			}
		}
	})
}

// jsonText is b as encoding/json decodes a string: each byte that is not
// part of valid UTF-8 becomes U+FFFD. parseLine leaves such bytes be.
func jsonText(b []byte) string {
	var s strings.Builder
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		s.WriteRune(r)
		b = b[size:]
	}
	return s.String()
}

func closeTo(a, b float64) bool {
	return a == b || math.Abs(a-b) <= 1e-12*math.Abs(b) || math.IsInf(a, 0) && math.IsInf(b, 0)
}

// referenceKind classifies a line that encoding/json decoded, by the rules
// parseLine documents.
func referenceKind(v any) lineKind {
	m, ok := v.(map[string]any)
	if !ok {
		return kindInvalid
	}
	isString := func(k string) bool { _, ok := m[k].(string); return ok }
	number := func(k string) (float64, bool) {
		n, ok := m[k].(json.Number)
		f, _ := strconv.ParseFloat(string(n), 64)
		return f, ok
	}
	if _, has := m["logger"]; has && !isString("logger") {
		return kindInvalid
	}
	if !isString("msg") {
		return kindInvalid
	}
	for _, k := range []string{"ts", "duration"} {
		if _, has := m[k]; has && !isString(k) {
			if _, ok := number(k); !ok {
				return kindInvalid
			}
		}
	}
	if _, has := m["status"]; has {
		if f, ok := number("status"); !ok || f != math.Trunc(f) || f < 0 || f > 999 {
			return kindInvalid
		}
	}
	if _, has := m["size"]; has {
		if f, ok := number("size"); !ok || f != math.Trunc(f) || f < 0 || f > math.MaxInt64/2 {
			return kindInvalid
		}
	}
	if r, has := m["request"]; has {
		req, ok := r.(map[string]any)
		if !ok {
			return kindInvalid
		}
		if u, has := req["uri"]; has {
			if _, ok := u.(string); !ok {
				return kindInvalid
			}
		}
	}
	if a, has := m["api_key"]; has && a != nil {
		ak, ok := a.(map[string]any)
		if !ok {
			return kindInvalid
		}
		for _, k := range []string{"id", "plan"} {
			if x, has := ak[k]; has {
				if _, ok := x.(string); !ok {
					return kindInvalid
				}
			}
		}
	}
	logger, hasLogger := m["logger"].(string)
	if hasLogger && logger != "http.log.access" && !strings.HasPrefix(logger, "http.log.access.") || m["msg"] != "handled request" {
		return kindOther
	}
	if _, has := m["request"]; !has {
		return kindInvalid
	}
	return kindAccess
}

func TestFilters(t *testing.T) {
	at := func(s float64) time.Time { return time.Unix(int64(s), 0) }
	tests := []struct {
		name string
		opts Options
		want map[string]int64
	}{
		{"none", Options{}, map[string]int64{"acme-prod": 3, "acme-ci": 2, "globex-trial": 2, NoneGroup: 2}},
		{"key", Options{Key: "acme-ci"}, map[string]int64{"acme-ci": 2}},
		{"unknown key", Options{Key: "nobody"}, map[string]int64{}},
		{"owner", Options{Owner: "acme", Owners: sampleOwners}, map[string]int64{"acme-prod": 3, "acme-ci": 2}},
		{"owner and key", Options{Owner: "acme", Key: "acme-ci", Owners: sampleOwners}, map[string]int64{"acme-ci": 2}},
		{"owner of another key", Options{Owner: "acme", Key: "globex-trial", Owners: sampleOwners}, map[string]int64{}},
		{"since, inclusive", Options{Since: at(t0 + 6)}, map[string]int64{"globex-trial": 1, NoneGroup: 2}},
		{"until, exclusive", Options{Until: at(t0 + 2)}, map[string]int64{"acme-prod": 2}},
		{"since and until", Options{Since: at(t0 + 2), Until: at(t0 + 5)}, map[string]int64{"acme-prod": 1, "acme-ci": 2}},
		{"since with fraction", Options{Since: at(t0 + 7).Add(-time.Millisecond)}, map[string]int64{NoneGroup: 2}},
		{"all and a time filter", Options{Owner: "acme", Owners: sampleOwners, Until: at(t0 + 4)},
			map[string]int64{"acme-prod": 3, "acme-ci": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := run(t, tt.opts, joinLines(sampleLines))
			if got := requests(r); !maps.Equal(got, tt.want) {
				t.Errorf("groups = %v, want %v", got, tt.want)
			}
			var sum int64
			for _, n := range tt.want {
				sum += n
			}
			if st := r.Stats(); st.Matched != sum || st.Entries != int64(len(sampleLines)) || r.Total().Requests != sum {
				t.Errorf("matched %d of %d entries, total %d; want %d of %d", st.Matched, st.Entries, r.Total().Requests, sum, len(sampleLines))
			}
		})
	}

	t.Run("time filter leaves out lines without ts", func(t *testing.T) {
		log := `{"msg":"handled request","request":{},"status":200}` + "\n" + sampleLines[0].String()
		r := run(t, Options{Since: at(t0 - 10)}, log)
		if got := requests(r); !maps.Equal(got, map[string]int64{"acme-prod": 1}) {
			t.Errorf("groups = %v", got)
		}
		r = run(t, Options{}, log)
		if got := requests(r); !maps.Equal(got, map[string]int64{"acme-prod": 1, NoneGroup: 1}) {
			t.Errorf("without a time filter: groups = %v", got)
		}
	})
}

func TestGroupBy(t *testing.T) {
	tests := []struct {
		by   By
		want map[string]int64
	}{
		{ByKey, map[string]int64{"acme-prod": 3, "acme-ci": 2, "globex-trial": 2, NoneGroup: 2}},
		{ByOwner, map[string]int64{"acme": 5, NoOwnerGroup: 2, NoneGroup: 2}},
		{ByPlan, map[string]int64{"pro": 3, "free": 2, NoneGroup: 4}},
		{ByStatus, map[string]int64{"200": 4, "401": 2, "403": 1, "429": 1, "500": 1}},
		{ByPath, map[string]int64{"/v1/items": 6, "/v1/orders": 1, "/v1/admin": 1, "/": 1}},
	}
	for _, tt := range tests {
		t.Run(string(tt.by), func(t *testing.T) {
			r := run(t, Options{By: tt.by, Owners: sampleOwners}, joinLines(sampleLines))
			if got := requests(r); !maps.Equal(got, tt.want) {
				t.Errorf("groups = %v, want %v", got, tt.want)
			}
		})
	}

	t.Run("owner of a key not in the keys file", func(t *testing.T) {
		r := run(t, Options{By: ByOwner, Owners: map[string]string{"acme-prod": "acme"}}, joinLines(sampleLines))
		want := map[string]int64{"acme": 3, UnknownGroup: 4, NoneGroup: 2}
		if got := requests(r); !maps.Equal(got, want) {
			t.Errorf("groups = %v, want %v", got, want)
		}
	})

	t.Run("sorted by requests, then name", func(t *testing.T) {
		r := run(t, Options{}, joinLines(sampleLines))
		var names []string
		for _, row := range r.Rows() {
			names = append(names, row.Group)
		}
		if want := []string{"acme-prod", NoneGroup, "acme-ci", "globex-trial"}; !slices.Equal(names, want) {
			t.Errorf("order = %q, want %q", names, want)
		}
	})
}

func TestPathCap(t *testing.T) {
	var lines []logLine
	for i := range 10 {
		for range i + 1 { // /p9 most often, /p0 least
			lines = append(lines, logLine{ts: t0, status: 200, uri: fmt.Sprintf("/p%d?q=%d", i, i), id: "k"})
		}
	}
	r := run(t, Options{By: ByPath, MaxPaths: 4}, joinLines(lines))
	// The first four paths seen keep their groups; the rest share one.
	want := map[string]int64{"/p0": 1, "/p1": 2, "/p2": 3, "/p3": 4, OtherGroup: 5 + 6 + 7 + 8 + 9 + 10}
	if got := requests(r); !maps.Equal(got, want) {
		t.Errorf("groups = %v, want %v", got, want)
	}
	if r.Total().Requests != 55 {
		t.Errorf("total = %d, want 55", r.Total().Requests)
	}

	r = run(t, Options{By: ByPath}, joinLines(lines))
	if n := len(r.Rows()); n != 10 {
		t.Errorf("default cap: %d groups, want 10", n)
	}
	if DefaultMaxPaths != 10000 {
		t.Errorf("DefaultMaxPaths = %d, want 10000", DefaultMaxPaths)
	}
}

func TestRowSums(t *testing.T) {
	r := run(t, Options{}, joinLines(sampleLines))
	rows := make(map[string]Row)
	for _, row := range r.Rows() {
		rows[row.Group] = row
	}
	at := func(s float64) time.Time { return time.Unix(int64(s), 0).UTC() }
	tests := []struct {
		group string
		want  Row
	}{
		{"acme-prod", Row{Requests: 3, Status2xx: 2, Status5xx: 1, BytesOut: 450, FirstSeen: at(t0), LastSeen: at(t0 + 2)}},
		{"acme-ci", Row{Requests: 2, Status2xx: 1, Status4xx: 1, Status403: 1, BytesOut: 1000, FirstSeen: at(t0 + 3), LastSeen: at(t0 + 4)}},
		{"globex-trial", Row{Requests: 2, Status2xx: 1, Status4xx: 1, Status429: 1, BytesOut: 200, FirstSeen: at(t0 + 5), LastSeen: at(t0 + 6)}},
		{NoneGroup, Row{Requests: 2, Status4xx: 2, Status401: 2, FirstSeen: at(t0 + 7), LastSeen: at(t0 + 8)}},
		{"TOTAL", Row{Requests: 9, Status2xx: 4, Status4xx: 4, Status5xx: 1, Status401: 2, Status403: 1, Status429: 1,
			BytesOut: 1650, FirstSeen: at(t0), LastSeen: at(t0 + 8)}},
	}
	rows["TOTAL"] = r.Total()
	for _, tt := range tests {
		t.Run(tt.group, func(t *testing.T) {
			got := rows[tt.group]
			want := tt.want
			want.Group = tt.group
			want.Share = 100 * float64(want.Requests) / 9
			// Durations are checked by TestQuantiles.
			got.HasDuration, got.P50, got.P95, got.P99 = false, 0, 0, 0
			if got != want {
				t.Errorf("row = %+v\nwant  %+v", got, want)
			}
		})
	}
}

func TestQuantiles(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	tests := []struct {
		name string
		n    int
		draw func() float64
	}{
		{"one", 1, func() float64 { return 0.0123 }},
		{"two", 2, func() float64 { return rng.Float64() }},
		{"constant", 1000, func() float64 { return 0.25 }},
		{"uniform 0-1s", 10000, func() float64 { return rng.Float64() }},
		{"lognormal around 5ms", 50000, func() float64 { return 0.005 * math.Exp(rng.NormFloat64()) }},
		{"bimodal", 20000, func() float64 {
			if rng.IntN(10) == 0 {
				return 2 + rng.Float64()
			}
			return 0.0001 + 0.0001*rng.Float64()
		}},
		{"with zeros", 1000, func() float64 {
			if rng.IntN(3) == 0 {
				return 0
			}
			return rng.ExpFloat64() / 100
		}},
		{"wide: 1ns to 1 day", 20000, func() float64 { return math.Pow(10, -9+rng.Float64()*14) }},
		{"nanoseconds", 1000, func() float64 { return float64(1+rng.IntN(1000)) * 1e-9 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h histogram
			values := make([]float64, tt.n)
			for i := range values {
				v := tt.draw()
				values[i] = v
				j, ok := index(v)
				h.add(v, j, ok)
			}
			slices.Sort(values)
			for _, q := range []float64{0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1} {
				rank := int(math.Ceil(q * float64(len(values)))) // nearest rank, 1-based
				exact := values[max(rank, 1)-1]
				got := h.quantile(q)
				tolerance := relativeError*exact + 1e-9*relativeError // values under 1ns count as 0
				if math.Abs(got-exact) > tolerance*(1+1e-9) {
					t.Errorf("q%v = %v, exact %v: off by %.3g%%, more than %v%%", q, got, exact,
						100*math.Abs(got-exact)/exact, 100*relativeError)
				}
			}
			if len(h.counts) > maxBuckets {
				t.Errorf("%d buckets, more than %d", len(h.counts), maxBuckets)
			}
		})
	}

	t.Run("memory does not grow with the count", func(t *testing.T) {
		var h histogram
		for i := range 1_000_000 {
			v := 0.0001 * math.Pow(1e5, float64(i%1000)/999) // 100µs to 10s
			j, ok := index(v)
			h.add(v, j, ok)
		}
		// log(1e5)/log(gamma) = 575 buckets, plus the slack of growth.
		if n := len(h.counts); n < 570 || n > 600 {
			t.Errorf("%d buckets for 100µs to 10s, want about 575", n)
		}
		if maxBuckets > 2100 {
			t.Errorf("maxBuckets = %d", maxBuckets)
		}
	})
}

func TestRowDurations(t *testing.T) {
	r := run(t, Options{}, joinLines(sampleLines))
	row := r.Rows()[0] // acme-prod: 10ms, 20ms, 1.5s
	if row.Group != "acme-prod" || !row.HasDuration {
		t.Fatalf("first row = %+v", row)
	}
	for _, c := range []struct {
		name      string
		got, want time.Duration
	}{{"p50", row.P50, 20 * time.Millisecond}, {"p95", row.P95, 1500 * time.Millisecond}, {"p99", row.P99, 1500 * time.Millisecond}} {
		if math.Abs(float64(c.got-c.want)) > relativeError*float64(c.want) {
			t.Errorf("%s = %v, want %v within 1%%", c.name, c.got, c.want)
		}
	}
	r = run(t, Options{}, `{"msg":"handled request","request":{},"status":200}`+"\n")
	if row := r.Rows()[0]; row.HasDuration || row.P50 != 0 {
		t.Errorf("no durations: row = %+v", row)
	}
}

// formatSample writes the report of sampleLines in format.
func formatSample(t *testing.T, format string) string {
	t.Helper()
	r := run(t, Options{}, joinLines(sampleLines))
	var b bytes.Buffer
	if err := Write(&b, format, ByKey, r.Rows(), r.Total()); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// TestFormats compares each format of the report of sampleLines with
// testdata/sample.<format>; -update rewrites them.
func TestFormats(t *testing.T) {
	for _, format := range Formats {
		t.Run(format, func(t *testing.T) {
			got := formatSample(t, format)
			golden := filepath.Join("testdata", "sample."+format)
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(want) {
				t.Errorf("got:\n%s\nwant (%s):\n%s", got, golden, want)
			}
		})
	}
	t.Run("json is an array with the documented fields", func(t *testing.T) {
		var rows []map[string]any
		if err := json.Unmarshal([]byte(formatSample(t, "json")), &rows); err != nil {
			t.Fatal(err)
		}
		if len(rows) != 4 {
			t.Fatalf("%d rows, want 4", len(rows))
		}
		keys := slices.Sorted(maps.Keys(rows[0]))
		want := slices.Sorted(slices.Values(csvHeader))
		if !slices.Equal(keys, want) {
			t.Errorf("fields = %q\nwant %q (the CSV columns)", keys, want)
		}
	})
	t.Run("empty", func(t *testing.T) {
		r := run(t, Options{Key: "nobody"}, joinLines(sampleLines))
		for format, want := range map[string]string{
			"json": "[]\n",
			"csv":  strings.Join(csvHeader, ",") + "\n",
			"table": "KEY    REQUESTS  SHARE  2XX  4XX  5XX  401  403  429  BYTES OUT  P50  P95  P99  FIRST SEEN  LAST SEEN\n" +
				"TOTAL         0      -    0    0    0    0    0    0        0 B    -    -    -  -           -\n",
		} {
			var b bytes.Buffer
			if err := Write(&b, format, ByKey, r.Rows(), r.Total()); err != nil {
				t.Fatal(err)
			}
			if b.String() != want {
				t.Errorf("%s:\n%q\nwant\n%q", format, b.String(), want)
			}
		}
	})
}

func TestFormatNumbers(t *testing.T) {
	durations := []struct {
		d    time.Duration
		want string
	}{
		{0, "0ns"}, {999, "999ns"}, {1000, "1.00µs"}, {257243, "257µs"}, {999499, "999µs"}, {999500, "1.00ms"},
		{12_345_678, "12.3ms"}, {1_500_000_000, "1.50s"}, {999_400_000_000, "999s"}, {999_600_000_000, "16m40s"},
		{26 * time.Hour, "26h0m0s"},
	}
	for _, tt := range durations {
		if got := formatDuration(tt.d); got != tt.want {
			t.Errorf("formatDuration(%d) = %q, want %q", int64(tt.d), got, tt.want)
		}
	}
	sizes := []struct {
		n    int64
		want string
	}{
		{0, "0 B"}, {1023, "1023 B"}, {1024, "1.00 KiB"}, {1536, "1.50 KiB"}, {999 * 1024, "999 KiB"}, {1000 * 1024, "0.98 MiB"},
		{1024 * 1024, "1.00 MiB"}, {5 << 30, "5.00 GiB"}, {math.MaxInt64, "8.00 EiB"},
	}
	for _, tt := range sizes {
		if got := formatBytes(tt.n); got != tt.want {
			t.Errorf("formatBytes(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
	if got := printable("/a\x1b[31mb\u0085"); got != "/a?[31mb?" {
		t.Errorf("printable = %q", got)
	}
}

func gzipped(t *testing.T, s string) string {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	if _, err := io.WriteString(zw, s); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestReadGzip(t *testing.T) {
	plain := joinLines(sampleLines)
	want := run(t, Options{}, plain).Rows()
	tests := []struct {
		name string
		log  string
	}{
		{"gzip", gzipped(t, plain)},
		// gzip -c a >> b, or cat a.gz b.gz: one stream of two members.
		{"two members", gzipped(t, joinLines(sampleLines[:4])) + gzipped(t, joinLines(sampleLines[4:]))},
		{"line split across members", gzipped(t, plain[:100]) + gzipped(t, plain[100:])},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := run(t, Options{}, tt.log)
			if got := r.Rows(); !slices.Equal(got, want) {
				t.Errorf("rows = %+v\nwant %+v", got, want)
			}
			if st := r.Stats(); st.Skipped != 0 || st.Entries != int64(len(sampleLines)) {
				t.Errorf("stats = %+v", st)
			}
		})
	}

	t.Run("truncated", func(t *testing.T) {
		z := gzipped(t, plain)
		r, _ := New(Options{})
		err := r.Read("access.log.gz", strings.NewReader(z[:len(z)-10]))
		if err == nil || !strings.Contains(err.Error(), "access.log.gz") {
			t.Errorf("err = %v, want an error that names the file", err)
		}
	})
	t.Run("read error", func(t *testing.T) {
		r, _ := New(Options{})
		err := r.Read("x.log", io.MultiReader(strings.NewReader(realOK+"\n"), iotest.ErrReader(errors.New("disk on fire"))))
		if err == nil || !strings.Contains(err.Error(), "disk on fire") || !strings.Contains(err.Error(), "x.log") {
			t.Errorf("err = %v", err)
		}
	})
}

func TestRotatedSet(t *testing.T) {
	// A rotated set: the oldest compressed, the newest plain, a line
	// broken at the end of a file (as when Caddy was killed mid-write).
	parts := []string{
		gzipped(t, joinLines(sampleLines[:3])),
		gzipped(t, joinLines(sampleLines[3:6])),
		joinLines(sampleLines[6:]),
	}
	whole := run(t, Options{}, joinLines(sampleLines))
	set := run(t, Options{}, parts...)
	if !slices.Equal(set.Rows(), whole.Rows()) || set.Total() != whole.Total() {
		t.Errorf("rotated set:\n%+v\nwant %+v", set.Rows(), whole.Rows())
	}

	t.Run("lines in the order given", func(t *testing.T) {
		var out bytes.Buffer
		noNewline := strings.TrimSuffix(parts[2], "\n")
		run(t, Options{Lines: &out}, parts[1], parts[0], noNewline)
		want := joinLines(sampleLines[3:6]) + joinLines(sampleLines[:3]) + joinLines(sampleLines[6:])
		if out.String() != want {
			t.Errorf("lines:\n%s\nwant:\n%s", out.String(), want)
		}
	})
	t.Run("a file ends mid-line", func(t *testing.T) {
		first := joinLines(sampleLines[:2]) + sampleLines[2].String()[:50]
		r := run(t, Options{}, first, joinLines(sampleLines[3:]))
		if st := r.Stats(); st.Skipped != 1 || st.FirstSkipped != "log0:3" || st.Entries != int64(len(sampleLines)-1) {
			t.Errorf("stats = %+v", st)
		}
	})
}

func TestLines(t *testing.T) {
	log := realOK + "\r\n" + realStartup + "\n" + "junk\n" + realMissing + "\n" + realLimited + "\n"
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"key", Options{Key: "acme-prod"}, realOK + "\r\n"},
		{"owner", Options{Owner: "globex", Owners: map[string]string{"globex-trial": "globex"}}, realLimited + "\n"},
		{"all access-log lines", Options{}, realOK + "\r\n" + realMissing + "\n" + realLimited + "\n"},
		{"time", Options{Since: time.Unix(1795761994, 500_000_000)}, realMissing + "\n" + realLimited + "\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			tt.opts.Lines = &out
			r := run(t, tt.opts, log)
			if out.String() != tt.want {
				t.Errorf("lines:\n%q\nwant:\n%q", out.String(), tt.want)
			}
			if len(r.Rows()) != 0 {
				t.Errorf("--lines also summed up: %+v", r.Rows())
			}
		})
	}
	t.Run("write error", func(t *testing.T) {
		r, _ := New(Options{Lines: errWriter{}})
		if err := r.Read("x", strings.NewReader(realOK)); err == nil {
			t.Error("no error")
		}
	})
}

type errWriter struct{}

func (errWriter) Write([]byte) (int, error) { return 0, errors.New("broken pipe") }

func TestSkipped(t *testing.T) {
	huge := `{"msg":"handled request","request":{"uri":"/big","headers":{"X":["` + strings.Repeat("a", 300<<10) + `"]}},"status":200}`
	tooLong := `{"msg":"handled request","request":{"uri":"/` + strings.Repeat("a", maxLine) + `"}}`
	tests := []struct {
		name  string
		log   string
		stats Stats
	}{
		{"clean", realOK + "\n" + realMissing + "\n", Stats{Lines: 2, Entries: 2, Matched: 2}},
		{"blank lines are not counted", "\n\n  \r\n" + realOK + "\n\n", Stats{Lines: 1, Entries: 1, Matched: 1}},
		{"other loggers", realStartup + "\n" + realOK + "\n" + realTLS + "\n",
			Stats{Lines: 3, Entries: 1, Matched: 1, OtherLoggers: 2}},
		{"not JSON", "Caddy started\n" + realOK + "\n{\"a\":1}\n" + realOK[:40] + "\n",
			Stats{Lines: 4, Entries: 1, Matched: 1, Skipped: 3, FirstSkipped: "log0:1"}},
		{"first skipped line number", realOK + "\n\n" + realOK + "\nx\ny\n",
			Stats{Lines: 4, Entries: 2, Matched: 2, Skipped: 2, FirstSkipped: "log0:4"}},
		{"line longer than the buffer", huge + "\n" + realOK + "\n", Stats{Lines: 2, Entries: 2, Matched: 2}},
		{"line longer than the limit", realOK + "\n" + tooLong + "\n" + realOK,
			Stats{Lines: 3, Entries: 2, Matched: 2, Skipped: 1, FirstSkipped: "log0:2"}},
		{"last line without a newline", realOK + "\n" + realMissing, Stats{Lines: 2, Entries: 2, Matched: 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := run(t, Options{}, tt.log)
			if st := r.Stats(); st != tt.stats {
				t.Errorf("stats = %+v\nwant    %+v", st, tt.stats)
			}
		})
	}
	t.Run("skipped lines are not counted in the report", func(t *testing.T) {
		r := run(t, Options{By: ByPath}, "junk\n"+huge+"\n"+tooLong+"\n")
		if got := requests(r); !maps.Equal(got, map[string]int64{"/big": 1}) {
			t.Errorf("groups = %v", got)
		}
	})
	t.Run("the first skipped line of the second file", func(t *testing.T) {
		r := run(t, Options{}, realOK+"\n", realOK+"\nnope\n")
		if st := r.Stats(); st.FirstSkipped != "log1:2" {
			t.Errorf("FirstSkipped = %q", st.FirstSkipped)
		}
	})
}

func TestNew(t *testing.T) {
	now := time.Now()
	tests := []struct {
		name string
		opts Options
		err  string
	}{
		{"defaults", Options{}, ""},
		{"bad grouping", Options{By: "host"}, `unknown grouping "host": want one of key, owner, plan, status, path`},
		{"owner without owners", Options{Owner: "acme"}, "owners of the keys are needed"},
		{"by owner without owners", Options{By: ByOwner}, "owners of the keys are needed"},
		{"empty time range", Options{Since: now, Until: now}, "the time range is empty"},
		{"since after until", Options{Since: now, Until: now.Add(-time.Hour)}, "the time range is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.opts)
			if tt.err == "" && err != nil || tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)) {
				t.Errorf("err = %v, want %q", err, tt.err)
			}
		})
	}
}

// TestStreaming checks that a report's memory is that of its groups:
// 18,000 lines take no more allocations than 90.
func TestStreaming(t *testing.T) {
	lines := []byte(joinLines(sampleLines))
	measure := func(n int) float64 {
		return testing.AllocsPerRun(1, func() {
			r, _ := New(Options{By: ByPath})
			if err := r.Read("x", &repeatReader{data: lines, n: n}); err != nil {
				t.Fatal(err)
			}
		})
	}
	small, large := measure(10), measure(2000)
	if large > small+10 {
		t.Errorf("%v allocations for 18,000 lines, %v for 90", large, small)
	}
}

// repeatReader reads data n times.
type repeatReader struct {
	data []byte
	n    int
	off  int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	if r.n == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.data[r.off:])
	r.off += n
	if r.off == len(r.data) {
		r.off = 0
		r.n--
	}
	return n, nil
}
