package apikey_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/keystile/caddy-apikey/internal/report"
)

// The -update flag rewrites the golden examples/<name>/caddy.json files.
// It is defined in init, after every package-level flag, so that another
// test file of this binary may define it too.
func init() {
	if flag.Lookup("update") == nil {
		flag.Bool("update", false, "rewrite golden files")
	}
}

func updateGolden() bool {
	f := flag.Lookup("update")
	return f != nil && f.Value.String() == "true"
}

// exampleServe holds, for each example, the test that runs its adapted
// config and sends the documented requests. An example without one fails
// TestExamples.
var exampleServe = map[string]func(t *testing.T, adapted []byte){
	"plans":       servePlans,
	"quickstart":  serveQuickstart,
	"static-site": serveStaticSite,
	"usage":       serveUsage,
}

// TestExamples adapts every examples/<name>/Caddyfile, compares the JSON
// with examples/<name>/caddy.json, and serves it. Run it with -update to
// rewrite the golden files after a deliberate change.
func TestExamples(t *testing.T) {
	caddyfiles, err := filepath.Glob("examples/*/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	if len(caddyfiles) == 0 {
		t.Fatal("no examples/*/Caddyfile")
	}
	for _, caddyfile := range caddyfiles {
		dir := filepath.Dir(caddyfile)
		name := filepath.Base(dir)
		t.Run(name, func(t *testing.T) {
			adapted := exampleAdapt(t, caddyfile)
			t.Run("golden", func(t *testing.T) {
				golden := filepath.Join(dir, "caddy.json")
				if updateGolden() {
					if err := os.WriteFile(golden, adapted, 0o644); err != nil {
						t.Fatal(err)
					}
				}
				want, err := os.ReadFile(golden)
				if err != nil {
					t.Fatalf("%v (run go test -run TestExamples -update to write it)", err)
				}
				if !bytes.Equal(adapted, want) {
					t.Errorf("adapted %s differs from %s (run with -update if that is intended)\ngot:\n%s\nwant:\n%s",
						caddyfile, golden, adapted, want)
				}
			})
			t.Run("serve", func(t *testing.T) {
				serve, ok := exampleServe[name]
				if !ok {
					t.Fatalf("examples/%s has no serve test; add one to exampleServe", name)
				}
				serve(t, adapted)
			})
		})
	}
}

// exampleAdapt adapts a Caddyfile as `caddy adapt --pretty` does from the
// repository root, and fails on adapter warnings.
func exampleAdapt(t *testing.T, caddyfile string) []byte {
	t.Helper()
	body, err := os.ReadFile(caddyfile)
	if err != nil {
		t.Fatal(err)
	}
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": caddyfile})
	if err != nil {
		t.Fatalf("adapting %s: %v", caddyfile, err)
	}
	for _, w := range warnings {
		t.Errorf("adapting %s: warning: %s", caddyfile, w.String())
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, cfg, "", "\t"); err != nil {
		t.Fatal(err)
	}
	pretty.WriteByte('\n')
	return pretty.Bytes()
}

// exampleStart runs an adapted example config on a free loopback port,
// with the admin endpoint off and logs that went to stdout or stderr in
// files, and stops it when the test ends. It expects one server.
func exampleStart(t *testing.T, adapted []byte) *e2eCaddy {
	t.Helper()
	c, err := exampleTryStart(t, adapted)
	if err != nil {
		t.Fatalf("loading example: %v", err)
	}
	return c
}

// exampleTryStart is exampleStart for configs that may fail to load; it
// returns the error of caddy.Load.
func exampleTryStart(t *testing.T, adapted []byte) (*e2eCaddy, error) {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// Quota counts start afresh for each run of an example.
	t.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
	c := &e2eCaddy{port: e2eFreePort(t), errorLog: filepath.Join(dir, "default.log")}
	c.base = "http://127.0.0.1:" + strconv.Itoa(c.port)
	c.client = e2eClient(t)

	// An example that has an admin endpoint keeps it, on a free port;
	// the others run without one.
	if admin, ok := cfg["admin"].(map[string]any); ok && admin["listen"] != nil {
		addr := fmt.Sprintf("127.0.0.1:%d", e2eFreePort(t))
		cfg["admin"] = map[string]any{"listen": addr, "config": map[string]any{"persist": false}}
		c.admin = "http://" + addr
	} else {
		cfg["admin"] = map[string]any{"disabled": true, "config": map[string]any{"persist": false}}
	}
	cfg["storage"] = map[string]any{"module": "file_system", "root": filepath.Join(dir, "storage")}

	servers := exampleObject(t, cfg, "apps", "http", "servers")
	if len(servers) != 1 {
		t.Fatalf("example has %d servers, want 1", len(servers))
	}
	var accessLogName string
	for name := range servers {
		srv := exampleObject(t, servers, name)
		srv["listen"] = []any{fmt.Sprintf("127.0.0.1:%d", c.port)}
		if logs, ok := srv["logs"].(map[string]any); ok {
			accessLogName, _ = logs["default_logger_name"].(string)
		}
	}

	logs := exampleObject(t, cfg, "logging", "logs")
	if _, ok := logs["default"]; !ok {
		logs["default"] = map[string]any{}
	}
	for name := range logs {
		l := exampleObject(t, logs, name)
		w, _ := l["writer"].(map[string]any)
		if out, _ := w["output"].(string); w == nil || out == "stdout" || out == "stderr" {
			l["writer"] = map[string]any{"output": "file", "filename": filepath.Join(dir, name+".log")}
		}
	}
	if accessLogName == "" {
		t.Fatal("example server has no access log")
	}
	c.accessLog = filepath.Join(dir, accessLogName+".log")

	var err error
	if c.config, err = json.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return c, caddy.Load(c.config, true)
}

// exampleObject returns the JSON object at path in m, creating it if
// absent.
func exampleObject(t *testing.T, m map[string]any, path ...string) map[string]any {
	t.Helper()
	for _, p := range path {
		v, ok := m[p]
		if !ok {
			v = map[string]any{}
			m[p] = v
		}
		next, ok := v.(map[string]any)
		if !ok {
			t.Fatalf("config %v: %T, want an object", path, v)
		}
		m = next
	}
	return m
}

// The quickstart's demo keys, as given to users; keys.json holds their
// hashes.
const (
	qsAcme    = "qs_acme_7Fh2kQ9xLm3pR8vT"
	qsGlobex  = "qs_globex_Wn4cY6bZ1dJ5sE0u"
	qsInitech = "qs_initech_Hq8rN2mV7kP3xA9t"
)

// exampleRequest is one documented request and the response it must get.
type exampleRequest struct {
	name   string
	uri    string
	logURI string // the uri as the access log has it, if not uri
	header http.Header
	status int
	body   string
	want   map[string]string // exact values of response headers
	userID string
	apiKey map[string]string
}

// exampleCheckedHeaders are the response headers exampleRequest checks;
// one missing from want must be absent.
var exampleCheckedHeaders = []string{"Content-Type", "Www-Authenticate", "Ratelimit", "Ratelimit-Policy", "Retry-After"}

func (rq exampleRequest) check(t *testing.T, c *e2eCaddy) {
	t.Helper()
	resp := c.get(t, rq.uri, rq.header)
	if resp.status != rq.status || resp.body != rq.body {
		t.Errorf("got %d %q, want %d %q", resp.status, resp.body, rq.status, rq.body)
	}
	for _, h := range exampleCheckedHeaders {
		want := rq.want[h]
		if got := resp.header.Values(h); !slices.Equal(got, e2eOptional(want)) {
			t.Errorf("%s = %q, want %q", h, got, e2eOptional(want))
		}
	}
	for h := range rq.want {
		if !slices.Contains(exampleCheckedHeaders, h) {
			t.Fatalf("test bug: header %s is not in exampleCheckedHeaders", h)
		}
	}
	logURI := rq.uri
	if rq.logURI != "" {
		logURI = rq.logURI
	}
	e2eCheckAccessEntry(t, c.accessEntry(t, logURI), rq.status, rq.userID, rq.apiKey)
}

func serveQuickstart(t *testing.T, adapted []byte) {
	c := exampleStart(t, adapted)
	const (
		jsonType  = "application/json"
		textType  = "text/plain; charset=utf-8"
		acmeBody  = "Hello, Acme production (key acme-prod, owner acme)!\n"
		acmeRules = `"default";q=60;w=60`
		globexPol = `"key";q=3;w=60`
	)
	missing := `{"error": "Unauthorized", "outcome": "missing"}` + "\n"
	requests := []exampleRequest{
		{name: "no key", uri: "/", status: 401, body: missing,
			want:   map[string]string{"Content-Type": jsonType, "Www-Authenticate": `Bearer realm="api"`},
			apiKey: e2eMissing},
		{name: "unknown key", uri: "/unknown", header: bearer("qs_nobody"), status: 401,
			body: `{"error": "Unauthorized", "outcome": "invalid"}` + "\n",
			want: map[string]string{"Content-Type": jsonType,
				"Www-Authenticate": `Bearer realm="api", error="invalid_token"`},
			apiKey: e2eInvalid},
		// 60/1m with bursts of 10: one request's worth comes back each
		// second.
		{name: "acme X-API-Key", uri: "/acme-header", header: xAPIKey(qsAcme), status: 200, body: acmeBody,
			want: map[string]string{"Content-Type": textType, "Ratelimit-Policy": acmeRules,
				"Ratelimit": `"default";r=9;t=1`},
			userID: "acme-prod", apiKey: e2eOK("acme-prod")},
		{name: "acme bearer", uri: "/acme", header: bearer(qsAcme), status: 200, body: acmeBody,
			want: map[string]string{"Content-Type": textType, "Ratelimit-Policy": acmeRules,
				"Ratelimit": `"default";r=8;t=2`},
			userID: "acme-prod", apiKey: e2eOK("acme-prod")},
	}
	// globex-trial has its own 3/1m: the fourth request is over it.
	for i, rate := range []string{`"key";r=2;t=20`, `"key";r=1;t=40`, `"key";r=0;t=60`} {
		requests = append(requests, exampleRequest{
			name: fmt.Sprintf("globex %d", i+1), uri: fmt.Sprintf("/globex/%d", i+1), header: bearer(qsGlobex),
			status: 200, body: "Hello, Globex trial (key globex-trial, owner globex)!\n",
			want:   map[string]string{"Content-Type": textType, "Ratelimit-Policy": globexPol, "Ratelimit": rate},
			userID: "globex-trial", apiKey: e2eOK("globex-trial"),
		})
	}
	requests = append(requests,
		exampleRequest{name: "globex 4", uri: "/globex/4", header: bearer(qsGlobex), status: 429,
			body: `{"error": "Too Many Requests", "outcome": "rate_limited"}` + "\n",
			want: map[string]string{"Content-Type": jsonType, "Ratelimit-Policy": globexPol,
				"Ratelimit": `"key";r=0;t=60`, "Retry-After": "20"},
			userID: "globex-trial", apiKey: e2eRateLimited("globex-trial")},
		exampleRequest{name: "initech, no rate limit", uri: "/initech", header: xAPIKey(qsInitech), status: 200,
			body:   "Hello, Initech batch jobs (key initech-batch, owner initech)!\n",
			want:   map[string]string{"Content-Type": textType},
			userID: "initech-batch", apiKey: e2eOK("initech-batch")},
	)
	for _, rq := range requests {
		t.Run(rq.name, func(t *testing.T) { rq.check(t, c) })
	}

	t.Run("access log", func(t *testing.T) {
		if got := c.accessEntry(t, "/acme").Request.Headers["Authorization"]; !slices.Equal(got, []string{"REDACTED"}) {
			t.Errorf("logged Authorization = %q, want [REDACTED]", got)
		}
		if got, ok := c.accessEntry(t, "/acme-header").Request.Headers["X-Api-Key"]; ok {
			t.Errorf("logged X-Api-Key = %q, want it filtered out", got)
		}
		data, err := os.ReadFile(c.accessLog)
		if err != nil {
			t.Fatal(err)
		}
		for _, key := range []string{qsAcme, qsGlobex, qsInitech} {
			if bytes.Contains(data, []byte(key)) {
				t.Errorf("access log contains key %s", key[:8]+"…")
			}
		}
	})
}

func serveStaticSite(t *testing.T, adapted []byte) {
	const (
		docsKey  = qsAcme // the hash of docs-reader is the quickstart's acme-prod
		ciKey    = "ci_static_site_Vb7Qe2Rk"
		htmlType = "text/html; charset=utf-8"
	)
	index, err := os.ReadFile("examples/static-site/site/index.html")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(index, []byte("Private docs")) {
		t.Fatalf("index.html does not say Private docs:\n%s", index)
	}

	t.Run("CI key unset", func(t *testing.T) {
		t.Setenv("STATIC_SITE_CI_KEY", "")
		_, err := exampleTryStart(t, adapted)
		const want = `provision http.handlers.api_key: keys[1] (id "ci"): key {env.STATIC_SITE_CI_KEY} is empty (is the variable set?)`
		if err == nil || !strings.HasSuffix(err.Error(), want) {
			t.Errorf("error = %v, want one ending in %s", err, want)
		}
	})

	t.Setenv("STATIC_SITE_CI_KEY", ciKey)
	c := exampleStart(t, adapted)
	requests := []exampleRequest{
		{name: "no key", uri: "/", status: 401,
			want: map[string]string{"Www-Authenticate": `Bearer realm="docs"`}, apiKey: e2eMissing},
		{name: "unknown key", uri: "/?n=1&api_key=nope", logURI: "/?n=1", status: 401,
			want:   map[string]string{"Www-Authenticate": `Bearer realm="docs", error="invalid_token"`},
			apiKey: e2eInvalid},
		{name: "X-API-Key is not a source", uri: "/?n=2", header: xAPIKey("not_a_source"), status: 401,
			want: map[string]string{"Www-Authenticate": `Bearer realm="docs"`}, apiKey: e2eMissing},
		{name: "docs-reader bearer", uri: "/?n=3", header: bearer(docsKey), status: 200, body: string(index),
			want: map[string]string{"Content-Type": htmlType}, userID: "docs-reader", apiKey: e2eOK("docs-reader")},
		{name: "docs-reader query", uri: "/?n=4&api_key=" + docsKey, logURI: "/?n=4", status: 200, body: string(index),
			want: map[string]string{"Content-Type": htmlType}, userID: "docs-reader", apiKey: e2eOK("docs-reader")},
		{name: "ci bearer", uri: "/?n=5", header: bearer(ciKey), status: 200, body: string(index),
			want: map[string]string{"Content-Type": htmlType}, userID: "ci", apiKey: e2eOK("ci")},
		{name: "ci query", uri: "/?api_key=" + ciKey + "&n=6", logURI: "/?n=6", status: 200, body: string(index),
			want: map[string]string{"Content-Type": htmlType}, userID: "ci", apiKey: e2eOK("ci")},
	}
	for _, rq := range requests {
		t.Run(rq.name, func(t *testing.T) { rq.check(t, c) })
	}

	t.Run("access log", func(t *testing.T) {
		data, err := os.ReadFile(c.accessLog)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(e2eReadLog[e2eAccessEntry](t, c.accessLog)); n != len(requests) {
			t.Errorf("access log has %d lines, want %d", n, len(requests))
		}
		for _, key := range []string{docsKey, ciKey} {
			if bytes.Contains(data, []byte(key)) {
				t.Errorf("access log contains key %s", key[:8]+"…")
			}
		}
	})
}

// The plans example's demo keys, made by caddy api-key generate --prefix
// demo; keys.json holds their hashes.
const (
	planFree      = "demo_1kQOUhnTulpv93Li5eN1giUnQLgyOyHJ1EbV72"
	planPro       = "demo_IpFGHcsb8jwDGOpMm2z0vuaRkEP0dSdm1eMKDt"
	planPartner   = "demo_D0KcyqciJ2mPkMEajRtQ8SSY9fAaFPWP39fPZ1"
	planOld       = "demo_G0ZZHnX0fofdMAa9erCJfTeXFJ71cOyR3dGLAg"
	planSuspended = "demo_qwiJSRngdRnu20AzgWKDiCb7bW4ChCnz0oFDVA"
)

func servePlans(t *testing.T, adapted []byte) {
	c := exampleStart(t, adapted)
	now := time.Now().UTC()
	midnight := time.Date(now.Year(), now.Month(), now.Day()+1, 0, 0, 0, 0, time.UTC)
	monthStart := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	monthSecs := int64(monthStart.AddDate(0, 1, 0).Sub(monthStart) / time.Second)

	type want struct {
		status      int
		body        string
		policy      string // RateLimit-Policy, exactly
		rateLimit   string // RateLimit up to the quota's t=, which depends on the time
		apiKey      map[string]string
		retryAfter  bool
		quotaTLimit time.Time // the quota's t= must not pass this
	}
	requests := []struct {
		name   string
		method string
		uri    string
		header http.Header
		want   want
	}{
		{"free GET", "GET", "/a", bearer(planFree), want{status: 200, body: "Demo free app: plan free\n",
			policy:    `"plan";q=5;w=60, "quota";q=1000;w=86400`,
			rateLimit: `"plan";r=4;t=12, "quota";r=999;t=`, quotaTLimit: midnight,
			apiKey: map[string]string{"id": "demo-free", "plan": "free", "outcome": "ok"}}},
		{"free POST is not allowed", "POST", "/b", bearer(planFree), want{status: 403,
			body:   `{"error": "Forbidden", "outcome": "forbidden", "restriction": "method"}` + "\n",
			apiKey: map[string]string{"id": "demo-free", "plan": "free", "outcome": "forbidden", "restriction": "method"}}},
		{"pro", "GET", "/c", xAPIKey(planPro), want{status: 200, body: "Demo pro app: plan pro\n",
			policy:    fmt.Sprintf(`"plan";q=60;w=60, "quota";q=100000;w=%d`, monthSecs),
			rateLimit: `"plan";r=19;t=1, "quota";r=99999;t=`, quotaTLimit: monthStart.AddDate(0, 1, 0),
			apiKey: map[string]string{"id": "demo-pro", "plan": "pro", "outcome": "ok"}}},
		{"partner reports", "GET", "/v1/reports/daily", bearer(planPartner), want{status: 200,
			body:   "Reporting partner: plan partner\n",
			apiKey: map[string]string{"id": "demo-partner", "plan": "partner", "outcome": "ok"}}},
		{"partner elsewhere", "GET", "/v1/users", bearer(planPartner), want{status: 403,
			body:   `{"error": "Forbidden", "outcome": "forbidden", "restriction": "path"}` + "\n",
			apiKey: map[string]string{"id": "demo-partner", "plan": "partner", "outcome": "forbidden", "restriction": "path"}}},
		{"rotated-out key", "GET", "/d", bearer(planOld), want{status: 401,
			body:   `{"error": "Unauthorized", "outcome": "expired"}` + "\n",
			apiKey: map[string]string{"id": "demo-old", "plan": "pro", "outcome": "expired"}}},
		{"suspended key", "GET", "/e", bearer(planSuspended), want{status: 401,
			body:   `{"error": "Unauthorized", "outcome": "disabled"}` + "\n",
			apiKey: map[string]string{"id": "demo-suspended", "plan": "free", "outcome": "disabled"}}},
		{"made-up demo key", "GET", "/f", bearer(planFree[:len(planFree)-1] + "x"), want{status: 401,
			body:   `{"error": "Unauthorized", "outcome": "invalid"}` + "\n",
			apiKey: e2eInvalid}},
	}
	// free allows 5 a minute: 1 above, then 4 more, then the limit.
	for i := 2; i <= 6; i++ {
		w := want{status: 200, body: "Demo free app: plan free\n",
			policy:    `"plan";q=5;w=60, "quota";q=1000;w=86400`,
			rateLimit: fmt.Sprintf(`"plan";r=%d;t=%d, "quota";r=%d;t=`, 5-i, i*12, 1000-i), quotaTLimit: midnight,
			apiKey: map[string]string{"id": "demo-free", "plan": "free", "outcome": "ok"}}
		if i == 6 {
			w = want{status: 429, body: `{"error": "Too Many Requests", "outcome": "rate_limited"}` + "\n",
				policy:    `"plan";q=5;w=60, "quota";q=1000;w=86400`,
				rateLimit: `"plan";r=0;t=60, "quota";r=995;t=`, quotaTLimit: midnight, retryAfter: true,
				apiKey: map[string]string{"id": "demo-free", "plan": "free", "outcome": "rate_limited"}}
		}
		requests = append(requests, struct {
			name   string
			method string
			uri    string
			header http.Header
			want   want
		}{fmt.Sprintf("free %d", i), "GET", fmt.Sprintf("/free/%d", i), bearer(planFree), w})
	}
	for _, rq := range requests {
		t.Run(rq.name, func(t *testing.T) {
			req, err := http.NewRequest(rq.method, c.base+rq.uri, nil)
			if err != nil {
				t.Fatal(err)
			}
			maps.Copy(req.Header, rq.header)
			resp, err := c.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != rq.want.status || string(body) != rq.want.body {
				t.Errorf("got %d %q, want %d %q", resp.StatusCode, body, rq.want.status, rq.want.body)
			}
			if got := resp.Header.Get("RateLimit-Policy"); got != rq.want.policy {
				t.Errorf("RateLimit-Policy = %q, want %q", got, rq.want.policy)
			}
			rl := resp.Header.Get("RateLimit")
			if rq.want.rateLimit == "" {
				if rl != "" {
					t.Errorf("RateLimit = %q, want none", rl)
				}
			} else if tail, ok := strings.CutPrefix(rl, rq.want.rateLimit); !ok {
				t.Errorf("RateLimit = %q, want it to start with %q", rl, rq.want.rateLimit)
			} else if secs, err := strconv.ParseInt(tail, 10, 64); err != nil || secs < 1 ||
				time.Now().Add(time.Duration(secs-1)*time.Second).After(rq.want.quotaTLimit) {
				t.Errorf("RateLimit quota t=%q: want whole seconds up to the end of the period, %s", tail, rq.want.quotaTLimit)
			}
			if got := resp.Header.Get("Retry-After"); (got != "") != rq.want.retryAfter {
				t.Errorf("Retry-After = %q, want one: %v", got, rq.want.retryAfter)
			}
			e2eCheckAccessEntry(t, c.accessEntry(t, rq.uri), rq.want.status, userIDOf(rq.want.apiKey), rq.want.apiKey)
		})
	}
}

func userIDOf(apiKey map[string]string) string { return apiKey["id"] }

// serveUsage runs the usage example: requests with the quickstart's keys,
// then the three ways to see them: the metrics, the admin API, and a
// report of the access log.
func serveUsage(t *testing.T, adapted []byte) {
	c := exampleStart(t, adapted)
	if c.admin == "" {
		t.Fatal("the usage example has no admin endpoint")
	}
	// Usage counts since Caddy started, and other tests of this process
	// used the same keys: compare growth.
	before := usageOf(t, c, "globex-trial")
	for _, h := range []http.Header{bearer(qsAcme), bearer(qsAcme), bearer(qsAcme), xAPIKey(qsGlobex), bearer("qs_nobody"), nil} {
		c.get(t, "/hello", h)
	}
	// globex-trial has its own 3/1m: the fourth request is over it.
	for range 4 {
		c.get(t, "/globex", bearer(qsGlobex))
	}

	t.Run("metrics", func(t *testing.T) {
		page := c.get(t, "/metrics", nil)
		for _, tc := range []struct {
			series string
			want   float64
		}{
			{`caddy_api_key_key_requests_total{key_id="acme-prod",outcome="ok"}`, 3},
			{`caddy_api_key_key_requests_total{key_id="globex-trial",outcome="rate_limited"}`, 2},
		} {
			if got := e2eMetric(t, page.body, tc.series); got < tc.want {
				t.Errorf("%s = %v, want at least %v", tc.series, got, tc.want)
			}
		}
	})

	t.Run("admin usage", func(t *testing.T) {
		k := usageOf(t, c, "globex-trial")
		if k.Requests["ok"]-before.Requests["ok"] != 3 || k.Requests["rate_limited"]-before.Requests["rate_limited"] != 2 ||
			k.Quota.Limit != "1000/day" || k.Quota.Used != 3 {
			t.Errorf("globex-trial usage = %+v, before the requests %+v", k, before)
		}
	})

	t.Run("report", func(t *testing.T) {
		e2eWaitLog(t, c.accessLog, "the last request", func(e e2eAccessEntry) bool {
			return e.Msg == "handled request" && strings.HasPrefix(e.Request.URI, "/metrics")
		})
		rep, err := report.New(report.Options{By: report.ByKey})
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(c.accessLog)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := rep.Read(c.accessLog, f); err != nil {
			t.Fatal(err)
		}
		got := map[string]report.Row{}
		for _, row := range rep.Rows() {
			got[row.Group] = row
		}
		if r := got["acme-prod"]; r.Requests != 3 || r.Status2xx != 3 {
			t.Errorf("acme-prod row = %+v", r)
		}
		if r := got["globex-trial"]; r.Requests != 5 || r.Status2xx != 3 || r.Status429 != 2 {
			t.Errorf("globex-trial row = %+v", r)
		}
		// No key, unknown key, and the /metrics requests (no api_key).
		if r := got[report.NoneGroup]; r.Status401 != 2 {
			t.Errorf("(none) row = %+v, want 2 answered 401", r)
		}
		// globex's key went in X-API-Key once: the filter removed it.
		data, err := os.ReadFile(c.accessLog)
		if err != nil {
			t.Fatal(err)
		}
		for _, key := range []string{qsAcme, qsGlobex} {
			if bytes.Contains(data, []byte(key)) {
				t.Errorf("access log contains key %s", key[:8]+"…")
			}
		}
	})
}

type exampleUsage struct {
	ID       string           `json:"id"`
	Requests map[string]int64 `json:"requests"`
	Quota    struct {
		Limit string `json:"limit"`
		Used  int64  `json:"used"`
	} `json:"quota"`
}

// usageOf asks the example's admin API for the usage of key id.
func usageOf(t *testing.T, c *e2eCaddy, id string) exampleUsage {
	t.Helper()
	resp := e2eGet(t, c.client, c.admin+"/api_key/usage?id="+id, nil)
	var ans []struct {
		Handler string         `json:"handler"`
		Keys    []exampleUsage `json:"keys"`
	}
	if err := json.Unmarshal([]byte(resp.body), &ans); err != nil || resp.status != 200 {
		t.Fatalf("/api_key/usage: %d %v: %s", resp.status, err, resp.body)
	}
	if len(ans) != 1 || ans[0].Handler != "usage-demo" || len(ans[0].Keys) != 1 {
		t.Fatalf("usage = %+v", ans)
	}
	return ans[0].Keys[0]
}
