package apikey

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/keystile/caddy-apikey/internal/keyformat"
	"github.com/keystile/caddy-apikey/internal/quota"
	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// polKey is the key of the keys-file entry with this id in these tests.
func polKey(id string) string { return "policy_test_key_" + id }

// polEntry returns a keys-file entry for polKey(id) with more fields, given
// as name, value pairs.
func polEntry(id string, fields ...any) map[string]any {
	e := map[string]any{"id": id, "hash": hashOf(polKey(id))}
	for i := 0; i+1 < len(fields); i += 2 {
		e[fields[i].(string)] = fields[i+1]
	}
	return e
}

// polWriteKeys writes a keys file with these entries to path.
func polWriteKeys(t *testing.T, path string, entries ...map[string]any) {
	t.Helper()
	data, err := json.Marshal(map[string]any{"keys": entries})
	if err != nil {
		t.Fatal(err)
	}
	writeKeysFile(t, path, string(data))
}

// polKeysFile writes a keys file in a directory of its own and returns
// its path.
func polKeysFile(t *testing.T, entries ...map[string]any) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys.json")
	polWriteKeys(t, path, entries...)
	return path
}

// polQuotaFile is a quota store of the test's own, so that tests share no
// counts.
func polQuotaFile(t *testing.T) string {
	return filepath.Join(t.TempDir(), "quotas.db")
}

// polReq is one request; zero fields take the defaults.
type polReq struct {
	key      string // sent as a Bearer token; none when empty
	method   string // default GET
	target   string // default /
	clientIP string // Caddy's client address; default from RemoteAddr, 192.0.2.1
	referer  string
}

type polResult struct {
	p      prepared
	next   *nextRecorder
	err    error
	status int // 200 when the request was handed on
}

func polServe(t *testing.T, h *Handler, rq polReq) polResult {
	t.Helper()
	hdr := http.Header{}
	if rq.key != "" {
		hdr.Set("Authorization", "Bearer "+rq.key)
	}
	if rq.referer != "" {
		hdr.Set("Referer", rq.referer)
	}
	p := prepare(cmp.Or(rq.target, "/"), hdr)
	if rq.method != "" {
		p.r.Method = rq.method
	}
	if rq.clientIP != "" {
		caddyhttp.SetVar(p.r.Context(), caddyhttp.ClientIPVarKey, rq.clientIP)
	}
	next := new(nextRecorder)
	err := h.ServeHTTP(p.w, p.r, next)
	res := polResult{p: p, next: next, err: err, status: http.StatusOK}
	if err != nil {
		var he caddyhttp.HandlerError
		if !errors.As(err, &he) {
			t.Fatalf("ServeHTTP: %v, want a caddyhttp.HandlerError", err)
		}
		res.status = he.StatusCode
	}
	return res
}

// polWant is what a request's answer must be.
type polWant struct {
	status      int // 200: handed on to the next handler
	outcome     string
	id          string
	plan        string
	restriction string
	challenge   string // WWW-Authenticate; "" for none
}

const polBadChallenge = `Bearer realm="api", error="invalid_token"`

// check asserts the status, whether next ran, the challenge, the
// http.api_key placeholders and the whole api_key log field.
func (res polResult) check(t *testing.T, w polWant) {
	t.Helper()
	if res.status != w.status {
		t.Fatalf("status = %d (err %v), want %d", res.status, res.err, w.status)
	}
	wantCalls := int64(0)
	if w.status == http.StatusOK {
		wantCalls = 1
	}
	if got := res.next.calls.Load(); got != wantCalls {
		t.Errorf("next called %d times, want %d", got, wantCalls)
	}
	if got := res.p.w.hdr.Values("WWW-Authenticate"); w.challenge == "" && len(got) != 0 || w.challenge != "" && !slices.Equal(got, []string{w.challenge}) {
		t.Errorf("WWW-Authenticate = %q, want %q", got, w.challenge)
	}
	for _, ph := range [][2]string{{"outcome", w.outcome}, {"id", w.id}, {"plan", w.plan}, {"restriction", w.restriction}} {
		if got := res.p.repl.ReplaceAll("{http.api_key."+ph[0]+"}", ""); got != ph[1] {
			t.Errorf("{http.api_key.%s} = %q, want %q", ph[0], got, ph[1])
		}
	}
	want := map[string]any{"outcome": w.outcome}
	for _, f := range [][2]string{{"id", w.id}, {"plan", w.plan}, {"restriction", w.restriction}} {
		if f[1] != "" {
			want[f[0]] = f[1]
		}
	}
	if got := logFieldOf(t, res.p); !reflect.DeepEqual(got, want) {
		t.Errorf("log field api_key = %v, want %v", got, want)
	}
}

// polMidnight is "{M}" in a wanted header value: the seconds until the
// next midnight UTC, ±2.
const polMidnight = "{M}"

// polSecsToMidnight returns the seconds, rounded up, until the next
// midnight UTC, when a day's quota ends. It skips a test that runs so close
// to midnight that the day could end during it.
func polSecsToMidnight(t *testing.T) int64 {
	t.Helper()
	now := time.Now().UTC()
	next := time.Date(now.Year(), now.Month(), now.Day()+1, 0, 0, 0, 0, time.UTC)
	if next.Sub(now) < time.Minute {
		t.Skip("too close to midnight UTC: the quota's day could end during the test")
	}
	return ratelimit.CeilSeconds(next.Sub(now))
}

// polHeader asserts that header name of hdr is want, where polMidnight
// stands for the seconds until midnight; want "" means no such header.
func polHeader(t *testing.T, hdr http.Header, name, want string, midnight int64) {
	t.Helper()
	vals := hdr.Values(name)
	if want == "" {
		if len(vals) != 0 {
			t.Errorf("%s = %q, want none", name, vals)
		}
		return
	}
	if len(vals) != 1 {
		t.Errorf("%s = %q, want one value %q", name, vals, want)
		return
	}
	re := regexp.MustCompile("^" + strings.ReplaceAll(regexp.QuoteMeta(want), regexp.QuoteMeta(polMidnight), `(\d+)`) + "$")
	m := re.FindStringSubmatch(vals[0])
	if m == nil {
		t.Errorf("%s = %q, want %q", name, vals[0], want)
		return
	}
	for _, s := range m[1:] {
		n, _ := strconv.ParseInt(s, 10, 64)
		if n < midnight-2 || n > midnight+2 {
			t.Errorf("%s = %q: %d s, want the %d s (±2) until midnight UTC", name, vals[0], n, midnight)
		}
	}
}

// TestKeyLifecycle checks that disabled, expired and not yet valid keys of
// a keys file are refused with 401 and their outcome, and that the others
// pass. The handler's clock stands in 2030, so that a real clock (if
// Provision dropped the injected one) would get "expired" wrong.
func TestKeyLifecycle(t *testing.T) {
	path := polKeysFile(t,
		polEntry("disabled", "disabled", true),
		polEntry("disabled-in-window", "disabled", true, "not_before", "2030-01-01T00:00:00Z", "expires", "2031-01-01T00:00:00Z"),
		polEntry("expired", "expires", "2030-01-01T00:00:00Z"),
		polEntry("expired-window", "not_before", "2029-01-01T00:00:00Z", "expires", "2030-06-01T11:59:59Z"),
		polEntry("not-yet-valid", "not_before", "2031-01-01T00:00:00Z"),
		polEntry("not-yet-valid-window", "not_before", "2030-06-01T12:00:01Z", "expires", "2031-01-01T00:00:00Z"),
		polEntry("window", "not_before", "2030-01-01T00:00:00Z", "expires", "2031-01-01T00:00:00Z"),
		polEntry("plain"),
	)
	clock := &fakeClock{}
	clock.ns.Store(time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC).UnixNano())
	h := &Handler{KeysFile: path}
	h.now = clock.now
	newTestHandler(t, h)

	tests := []struct {
		id      string
		outcome string
	}{
		{"disabled", outcomeDisabled},
		{"disabled-in-window", outcomeDisabled},
		{"expired", outcomeExpired},
		{"expired-window", outcomeExpired},
		{"not-yet-valid", outcomeNotYetValid},
		{"not-yet-valid-window", outcomeNotYetValid},
		{"window", outcomeOK},
		{"plain", outcomeOK},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			want := polWant{status: http.StatusUnauthorized, outcome: tt.outcome, id: tt.id, challenge: polBadChallenge}
			if tt.outcome == outcomeOK {
				want = polWant{status: http.StatusOK, outcome: outcomeOK, id: tt.id}
			}
			// Twice: the second lookup comes from the cache.
			for range 2 {
				polServe(t, h, polReq{key: polKey(tt.id)}).check(t, want)
				h.cache.c.Wait()
			}
		})
	}
}

// TestKeyLifecycleBoundaries moves the handler's clock across the instants
// of expires and not_before: a key expires exactly at its expires instant
// and is valid from its not_before instant on, whatever the cache holds.
func TestKeyLifecycleBoundaries(t *testing.T) {
	at := time.Date(2030, 6, 1, 12, 0, 0, 0, time.UTC)
	path := polKeysFile(t,
		polEntry("ends", "expires", "2030-06-01T12:00:00Z"),
		polEntry("ends-offset", "expires", "2030-06-01T14:00:00+02:00"),
		polEntry("ends-nanosecond-later", "expires", "2030-06-01T12:00:00.000000001Z"),
		polEntry("starts", "not_before", "2030-06-01T12:00:00Z"),
	)
	clock := &fakeClock{}
	h := &Handler{KeysFile: path}
	h.now = clock.now
	newTestHandler(t, h)

	tests := []struct {
		name    string
		offset  time.Duration // from at
		id      string
		outcome string
	}{
		{"expires: one ns before", -1, "ends", outcomeOK},
		{"expires: at the instant", 0, "ends", outcomeExpired},
		{"expires: after", time.Hour, "ends", outcomeExpired},
		{"expires with offset: one ns before", -1, "ends-offset", outcomeOK},
		{"expires with offset: at the instant", 0, "ends-offset", outcomeExpired},
		{"fractional expires: at the second", 0, "ends-nanosecond-later", outcomeOK},
		{"fractional expires: at the instant", 1, "ends-nanosecond-later", outcomeExpired},
		{"not_before: one ns before", -1, "starts", outcomeNotYetValid},
		{"not_before: at the instant", 0, "starts", outcomeOK},
		{"not_before: back before it", -time.Hour, "starts", outcomeNotYetValid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock.ns.Store(at.Add(tt.offset).UnixNano())
			want := polWant{status: http.StatusUnauthorized, outcome: tt.outcome, id: tt.id, challenge: polBadChallenge}
			if tt.outcome == outcomeOK {
				want = polWant{status: http.StatusOK, outcome: outcomeOK, id: tt.id}
			}
			polServe(t, h, polReq{key: polKey(tt.id)}).check(t, want)
			h.cache.c.Wait()
		})
	}
}

// polStep is one request of a sequence and what its answer must be.
type polStep struct {
	status  int
	outcome string
	policy  string // RateLimit-Policy; "" for none
	rate    string // RateLimit; "" for none
	retry   string // Retry-After; "" for none
}

// TestPlans checks that a key takes its plan's rate and quota, that its own
// setting of a kind replaces the plan's, that a plan's "off" exempts its
// keys, and that the plan is in the placeholder and the log field.
func TestPlans(t *testing.T) {
	path := polKeysFile(t,
		polEntry("no-plan"),
		polEntry("free", "plan", "free"),
		polEntry("free-own-rate", "plan", "free", "rate", "5/1m"),
		polEntry("gold", "plan", "gold"),
		polEntry("q", "plan", "q"),
		polEntry("q-own-quota", "plan", "q", "quota", "1/day"),
	)
	h := newTestHandler(t, &Handler{
		KeysFile:  path,
		Rate:      "100/1m",
		QuotaFile: polQuotaFile(t),
		Plans: map[string]*Plan{
			"free": {Rate: "2/1m"},
			"gold": {Rate: "off"},
			"q":    {Quota: "3/day"},
		},
	})
	clock := &fakeClock{}
	clock.advance(time.Hour)
	h.limiter = newLimiter(clock.now)
	midnight := polSecsToMidnight(t)

	const def = `"default";q=100;w=60`
	ok := func(policy, rate string) polStep { return polStep{http.StatusOK, outcomeOK, policy, rate, ""} }
	tests := []struct {
		id, plan string
		steps    []polStep
	}{
		{"no-plan", "", []polStep{ok(def, `"default";r=99;t=1`)}},
		{"free", "free", []polStep{
			ok(`"plan";q=2;w=60`, `"plan";r=1;t=30`),
			ok(`"plan";q=2;w=60`, `"plan";r=0;t=60`),
			{http.StatusTooManyRequests, outcomeRateLimited, `"plan";q=2;w=60`, `"plan";r=0;t=60`, "30"},
		}},
		{"free-own-rate", "free", []polStep{
			ok(`"key";q=5;w=60`, `"key";r=4;t=12`),
			ok(`"key";q=5;w=60`, `"key";r=3;t=24`),
			ok(`"key";q=5;w=60`, `"key";r=2;t=36`),
		}},
		{"gold", "gold", []polStep{ok("", ""), ok("", ""), ok("", ""), ok("", "")}},
		{"q", "q", []polStep{
			ok(def+`, "quota";q=3;w=86400`, `"default";r=99;t=1, "quota";r=2;t={M}`),
			ok(def+`, "quota";q=3;w=86400`, `"default";r=98;t=2, "quota";r=1;t={M}`),
			ok(def+`, "quota";q=3;w=86400`, `"default";r=97;t=2, "quota";r=0;t={M}`),
			{http.StatusTooManyRequests, outcomeQuotaExceeded, `"quota";q=3;w=86400`, `"quota";r=0;t={M}`, polMidnight},
		}},
		{"q-own-quota", "q", []polStep{
			ok(def+`, "quota";q=1;w=86400`, `"default";r=99;t=1, "quota";r=0;t={M}`),
			{http.StatusTooManyRequests, outcomeQuotaExceeded, `"quota";q=1;w=86400`, `"quota";r=0;t={M}`, polMidnight},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			for i, s := range tt.steps {
				res := polServe(t, h, polReq{key: polKey(tt.id)})
				res.check(t, polWant{status: s.status, outcome: s.outcome, id: tt.id, plan: tt.plan})
				polHeader(t, res.p.w.hdr, "RateLimit-Policy", s.policy, midnight)
				polHeader(t, res.p.w.hdr, "RateLimit", s.rate, midnight)
				polHeader(t, res.p.w.hdr, "Retry-After", s.retry, midnight)
				if t.Failed() {
					t.Fatalf("request %d failed", i+1)
				}
			}
		})
	}
}

// TestUnknownPlan checks that a key whose plan the handler does not define
// stops Provision, and keeps a new version of the file from loading.
func TestUnknownPlan(t *testing.T) {
	t.Run("provision", func(t *testing.T) {
		tests := []struct {
			name    string
			plans   map[string]*Plan
			entries []map[string]any
			want    string
		}{
			{
				name:    "one unknown",
				plans:   map[string]*Plan{"free": {}},
				entries: []map[string]any{polEntry("a", "plan", "free"), polEntry("x", "plan", "nope")},
				want:    `key id "x": unknown plan "nope"`,
			},
			{
				name:    "no plans defined",
				entries: []map[string]any{polEntry("a", "plan", "free")},
				want:    `key id "a": unknown plan "free"`,
			},
			{
				name:    "two unknown",
				plans:   map[string]*Plan{"free": {}},
				entries: []map[string]any{polEntry("y", "plan", "zip"), polEntry("a", "plan", "free"), polEntry("x", "plan", "nope")},
				want:    `key id "x": unknown plan "nope" (and 1 more keys with unknown plans)`,
			},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				path := polKeysFile(t, tt.entries...)
				ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
				defer cancel()
				h := &Handler{KeysFile: path, Plans: tt.plans, QuotaFile: polQuotaFile(t)}
				err := h.Provision(ctx)
				if cerr := h.Cleanup(); cerr != nil {
					t.Errorf("Cleanup: %v", cerr)
				}
				if want := "keys file " + path + ": " + tt.want; err == nil || err.Error() != want {
					t.Fatalf("Provision error = %v, want %q", err, want)
				}
			})
		}
	})

	t.Run("reload", func(t *testing.T) {
		slowPolling(t)
		path := polKeysFile(t, polEntry("a", "plan", "free"), polEntry("b"))
		h := newTestHandler(t, &Handler{KeysFile: path, QuotaFile: polQuotaFile(t), Plans: map[string]*Plan{"free": {}}})
		polServe(t, h, polReq{key: polKey("a")}).check(t, polWant{status: http.StatusOK, outcome: outcomeOK, id: "a", plan: "free"})

		// A version with a key on an unknown plan loads (so that a typo
		// in one key cannot hold back later edits, revocations included);
		// this site refuses that key, and the others work.
		polWriteKeys(t, path, polEntry("a", "plan", "free"), polEntry("b"), polEntry("c", "plan", "nope"))
		if err := h.keysFile.check(); err != nil {
			t.Fatalf("check: %v", err)
		}
		if got := ids(h.keysFile.set.Load()); got != "a,b,c" {
			t.Fatalf("keys in use = %s, want a,b,c", got)
		}
		polServe(t, h, polReq{key: polKey("a")}).check(t, polWant{status: http.StatusOK, outcome: outcomeOK, id: "a", plan: "free"})
		polServe(t, h, polReq{key: polKey("b")}).check(t, polWant{status: http.StatusOK, outcome: outcomeOK, id: "b"})
		polServe(t, h, polReq{key: polKey("c")}).check(t, polWant{status: http.StatusUnauthorized, outcome: outcomeInvalid, challenge: polBadChallenge})

		// Fixed, the file loads.
		polWriteKeys(t, path, polEntry("a", "plan", "free"), polEntry("c", "plan", "free"))
		if err := h.keysFile.check(); err != nil {
			t.Fatalf("check of the fixed file: %v", err)
		}
		polServe(t, h, polReq{key: polKey("c")}).check(t, polWant{status: http.StatusOK, outcome: outcomeOK, id: "c", plan: "free"})
		polServe(t, h, polReq{key: polKey("b")}).check(t, polWant{status: http.StatusUnauthorized, outcome: outcomeInvalid, challenge: polBadChallenge})
	})
}

// TestRestrictions sends requests that each restriction allows and
// forbids, set per key and through a plan, where a key's own list of a
// kind replaces its plan's and leaves the plan's other kinds in force.
func TestRestrictions(t *testing.T) {
	const ref = "https://*.example.com/*"
	path := polKeysFile(t,
		polEntry("ip4", "allow_ips", []string{"10.1.0.0/16"}),
		polEntry("ip6", "allow_ips", []string{"2001:db8::/32"}),
		polEntry("single4", "allow_ips", []string{"192.0.2.7"}),
		polEntry("single6", "allow_ips", []string{"2001:db8::7"}),
		polEntry("mapped-single", "allow_ips", []string{"::ffff:192.0.2.9"}),
		polEntry("methods", "allow_methods", []string{"get", "POST"}),
		polEntry("paths", "allow_paths", []string{"/v1", "/files/*.png"}),
		polEntry("referrers", "allow_referrers", []string{ref}),
		polEntry("all", "allow_methods", []string{"GET"}, "allow_ips", []string{"10.0.0.0/8"}, "allow_paths", []string{"/v1"}, "allow_referrers", []string{ref}),
		polEntry("office", "plan", "office"),
		polEntry("office-own-ips", "plan", "office", "allow_ips", []string{"192.0.2.0/24"}),
		polEntry("office-own-methods", "plan", "office", "allow_methods", []string{"DELETE"}),
		polEntry("web", "plan", "web"),
	)
	h := newTestHandler(t, &Handler{KeysFile: path, QuotaFile: polQuotaFile(t), Plans: map[string]*Plan{
		"office": {Restrictions: Restrictions{AllowIPs: []string{"10.0.0.0/8"}, AllowMethods: []string{"GET"}}},
		"web":    {Restrictions: Restrictions{AllowReferrers: []string{ref}, AllowPaths: []string{"/public"}}},
	}})
	planOf := map[string]string{"office": "office", "office-own-ips": "office", "office-own-methods": "office", "web": "web"}

	tests := []struct {
		name   string
		id     string
		rq     polReq
		failed string // the restriction that fails; "" when the request passes
	}{
		{"ipv4 in prefix", "ip4", polReq{clientIP: "10.1.2.3"}, ""},
		{"ipv4 outside prefix", "ip4", polReq{clientIP: "10.2.0.1"}, restrictIP},
		{"ipv4-mapped client in ipv4 prefix", "ip4", polReq{clientIP: "::ffff:10.1.2.3"}, ""},
		{"ipv4-mapped client outside ipv4 prefix", "ip4", polReq{clientIP: "::ffff:10.2.0.1"}, restrictIP},
		{"ipv6 client against ipv4 prefix", "ip4", polReq{clientIP: "2001:db8::1"}, restrictIP},
		{"Caddy's client address from RemoteAddr", "ip4", polReq{}, restrictIP},
		{"unparsable client address", "ip4", polReq{clientIP: "not-an-ip"}, restrictIP},
		{"ipv6 in prefix", "ip6", polReq{clientIP: "2001:db8:1::5"}, ""},
		{"ipv6 outside prefix", "ip6", polReq{clientIP: "2001:db9::1"}, restrictIP},
		{"ipv4 client against ipv6 prefix", "ip6", polReq{clientIP: "10.1.2.3"}, restrictIP},
		{"single ipv4 address", "single4", polReq{clientIP: "192.0.2.7"}, ""},
		{"single ipv4 address, mapped client", "single4", polReq{clientIP: "::ffff:192.0.2.7"}, ""},
		{"single ipv4 address, another client", "single4", polReq{clientIP: "192.0.2.8"}, restrictIP},
		{"single ipv6 address", "single6", polReq{clientIP: "2001:db8::7"}, ""},
		{"single ipv6 address, another client", "single6", polReq{clientIP: "2001:db8::8"}, restrictIP},
		{"mapped single address, ipv4 client", "mapped-single", polReq{clientIP: "192.0.2.9"}, ""},
		{"mapped single address, mapped client", "mapped-single", polReq{clientIP: "::ffff:192.0.2.9"}, ""},
		{"mapped single address, another client", "mapped-single", polReq{clientIP: "192.0.2.10"}, restrictIP},

		{"method GET (configured in lower case)", "methods", polReq{method: http.MethodGet}, ""},
		{"method POST", "methods", polReq{method: http.MethodPost}, ""},
		{"method DELETE", "methods", polReq{method: http.MethodDelete}, restrictMethod},
		{"method HEAD", "methods", polReq{method: http.MethodHead}, restrictMethod},

		{"path prefix itself", "paths", polReq{target: "/v1"}, ""},
		{"path under prefix", "paths", polReq{target: "/v1/x"}, ""},
		{"path prefix with slash", "paths", polReq{target: "/v1/"}, ""},
		{"path sharing the prefix's characters", "paths", polReq{target: "/v10"}, restrictPath},
		{"path stepping out with dot segments", "paths", polReq{target: "/v1/../admin"}, restrictPath},
		{"path stepping out with escaped dot segments", "paths", polReq{target: "/v1/%2e%2e/admin"}, restrictPath},
		{"path with a query", "paths", polReq{target: "/v1/x?a=/admin"}, ""},
		{"path glob", "paths", polReq{target: "/files/a.png"}, ""},
		{"path glob across slashes", "paths", polReq{target: "/files/a/b.png"}, ""},
		{"path glob, other extension", "paths", polReq{target: "/files/a.jpg"}, restrictPath},
		{"path glob, dot segments", "paths", polReq{target: "/files/../secret.png"}, restrictPath},
		{"path elsewhere", "paths", polReq{target: "/admin"}, restrictPath},

		{"referrer matches", "referrers", polReq{referer: "https://app.example.com/page"}, ""},
		{"referrer of another site", "referrers", polReq{referer: "https://example.org/"}, restrictReferrer},
		{"referrer of the bare domain", "referrers", polReq{referer: "https://example.com/"}, restrictReferrer},
		{"referrer over http", "referrers", polReq{referer: "http://app.example.com/page"}, restrictReferrer},
		{"referrer missing", "referrers", polReq{}, restrictReferrer},

		{"all: method is checked first", "all", polReq{method: http.MethodPost, clientIP: "192.0.2.1", target: "/admin"}, restrictMethod},
		{"all: then the address", "all", polReq{clientIP: "192.0.2.1", target: "/admin"}, restrictIP},
		{"all: then the path", "all", polReq{clientIP: "10.0.0.1", target: "/admin"}, restrictPath},
		{"all: then the referrer", "all", polReq{clientIP: "10.0.0.1", target: "/v1"}, restrictReferrer},
		{"all: every one passes", "all", polReq{clientIP: "10.0.0.1", target: "/v1/x", referer: "https://app.example.com/"}, ""},

		{"plan: allowed", "office", polReq{clientIP: "10.1.2.3"}, ""},
		{"plan: address", "office", polReq{clientIP: "192.0.2.1"}, restrictIP},
		{"plan: method", "office", polReq{clientIP: "10.1.2.3", method: http.MethodPost}, restrictMethod},
		{"key's addresses replace the plan's", "office-own-ips", polReq{clientIP: "192.0.2.1"}, ""},
		{"key's addresses: the plan's no longer allowed", "office-own-ips", polReq{clientIP: "10.1.2.3"}, restrictIP},
		{"key's addresses: the plan's methods still apply", "office-own-ips", polReq{clientIP: "192.0.2.1", method: http.MethodPost}, restrictMethod},
		{"key's methods replace the plan's", "office-own-methods", polReq{clientIP: "10.1.2.3", method: http.MethodDelete}, ""},
		{"key's methods: the plan's no longer allowed", "office-own-methods", polReq{clientIP: "10.1.2.3"}, restrictMethod},
		{"key's methods: the plan's addresses still apply", "office-own-methods", polReq{clientIP: "192.0.2.1", method: http.MethodDelete}, restrictIP},
		{"plan referrer and path: allowed", "web", polReq{target: "/public/x", referer: "https://www.example.com/"}, ""},
		{"plan referrer missing", "web", polReq{target: "/public/x"}, restrictReferrer},
		{"plan path", "web", polReq{target: "/v1", referer: "https://www.example.com/"}, restrictPath},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rq := tt.rq
			rq.key = polKey(tt.id)
			want := polWant{status: http.StatusOK, outcome: outcomeOK, id: tt.id, plan: planOf[tt.id]}
			if tt.failed != "" {
				want.status, want.outcome, want.restriction = http.StatusForbidden, outcomeForbidden, tt.failed
			}
			polServe(t, h, rq).check(t, want)
		})
	}
}

// TestRestrictionsMappedPrefix allows a client by an IPv4-mapped IPv6 CIDR
// prefix. A single mapped address is unmapped at load and every client
// address before the check, but a mapped prefix is kept as IPv6, so it
// can never contain a client.
func TestRestrictionsMappedPrefix(t *testing.T) {
	path := polKeysFile(t, polEntry("mapped-prefix", "allow_ips", []string{"::ffff:10.1.0.0/112"}))
	h := newTestHandler(t, &Handler{KeysFile: path, QuotaFile: polQuotaFile(t)})
	for _, ip := range []string{"10.1.2.3", "::ffff:10.1.2.3"} {
		t.Run(ip, func(t *testing.T) {
			polServe(t, h, polReq{key: polKey("mapped-prefix"), clientIP: ip}).
				check(t, polWant{status: http.StatusOK, outcome: outcomeOK, id: "mapped-prefix"})
		})
	}
}

func TestGlobMatch(t *testing.T) {
	tests := []struct {
		pattern, s string
		want       bool
	}{
		{"", "", true},
		{"", "a", false},
		{"a", "", false},
		{"*", "", true},
		{"**", "", true},
		{"*", "any/thing at all", true},
		{"abc", "abc", true},
		{"abc", "abd", false},
		{"abc", "ab", false},
		{"ab", "abc", false},
		{"a*", "a", true},
		{"a*", "ba", false},
		{"*a", "ba", true},
		{"*a", "ab", false},
		{"a*b*c", "abc", true},
		{"a*b*c", "aXXbYYc", true},
		{"a*b*c", "acb", false},
		{"a*b*c", "abcabc", true},
		{"a*b*c", "abcab", false},
		{"*a*a*", "aa", true},
		{"*a*a*", "a", false},
		{"a**b", "ab", true},
		{"*.png", "x.png.png", true},
		{"*.png", "x.png.jpg", false},
		{"a?c", "abc", false}, // only * is special
		{"a?c", "a?c", true},
		{"https://*.example.com/*", "https://app.example.com/page", true},
		{"https://*.example.com/*", "https://a.b.example.com/", true},
		{"https://*.example.com/*", "https://example.com/", false},
		{"https://*.example.com/*", "https://app.example.com", false},
		{"https://*.example.com/*", "https://example.org/", false},
	}
	for _, tt := range tests {
		t.Run(tt.pattern+" "+tt.s, func(t *testing.T) {
			if got := globMatch(tt.pattern, tt.s); got != tt.want {
				t.Errorf("globMatch(%q, %q) = %v, want %v", tt.pattern, tt.s, got, tt.want)
			}
		})
	}

	// A backtracking matcher takes time exponential in the stars here; a
	// linear one answers at once.
	t.Run("pathological", func(t *testing.T) {
		long := strings.Repeat("a", 100_000)
		done := make(chan bool, 1)
		go func() { done <- globMatch("*a*a*a*a*a*b", long) }()
		select {
		case got := <-done:
			if got {
				t.Error(`globMatch("*a*a*a*a*a*b", "aaa…") = true, want false`)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("globMatch took more than 10 s on 100000 characters")
		}
		if !globMatch("*a*a*a*a*a*", long) {
			t.Error(`globMatch("*a*a*a*a*a*", "aaa…") = false, want true`)
		}
		if allocs := testing.AllocsPerRun(10, func() { globMatch("*a*a*a*a*a*b", long[:1000]) }); allocs != 0 {
			t.Errorf("globMatch allocates %v times, want 0", allocs)
		}
	})
}

func TestMatchPaths(t *testing.T) {
	tests := []struct {
		patterns []string
		path     string
		want     bool
	}{
		{[]string{"/v1"}, "/v1", true},
		{[]string{"/v1"}, "/v1/", true},
		{[]string{"/v1"}, "/v1/users", true},
		{[]string{"/v1"}, "/v1/./users", true},
		{[]string{"/v1"}, "//v1", true},
		{[]string{"/v1"}, "/v10", false},
		{[]string{"/v1"}, "/v1/../admin", false},
		{[]string{"/v1"}, "/v1/x/../../admin", false},
		{[]string{"/v1"}, "/V1", false},
		{[]string{"/v1"}, "", false},
		{[]string{"/v1"}, "/", false},
		{[]string{"/v1/"}, "/v1", true},
		{[]string{"/v1/"}, "/v1/users", true},
		{[]string{"/v1/"}, "/v10", false},
		{[]string{"/"}, "/anything/at/all", true},
		{[]string{"/"}, "", true},
		{[]string{"/files/*.png"}, "/files/a.png", true},
		{[]string{"/files/*.png"}, "/files/a/b.png", true},
		{[]string{"/files/*.png"}, "/files/.png", true},
		{[]string{"/files/*.png"}, "/files/a.jpg", false},
		{[]string{"/files/*.png"}, "/files/../secret.png", false},
		{[]string{"/files/*.png"}, "/files/a.png/", true}, // cleaned to /files/a.png
		{[]string{"/a", "/b/*"}, "/a/x", true},
		{[]string{"/a", "/b/*"}, "/b/x", true},
		{[]string{"/a", "/b/*"}, "/b", false},
		{[]string{"/a", "/b/*"}, "/c", false},
		{[]string{"/*/*/*/*/*/z"}, "/" + strings.Repeat("a/", 10_000) + "y", false},
		{nil, "/", false},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.patterns, ",")+" "+tt.path[:min(len(tt.path), 40)], func(t *testing.T) {
			if got := matchPaths(tt.patterns, tt.path); got != tt.want {
				t.Errorf("matchPaths(%q, %.40q) = %v, want %v", tt.patterns, tt.path, got, tt.want)
			}
		})
	}
}

// TestKeysFilePolicyErrors checks that bad restrictions, quotas and times
// in a keys file are refused with the entry and the field named.
func TestKeysFilePolicyErrors(t *testing.T) {
	tests := []struct {
		name   string
		fields string // more fields of keys[0], id "x"
		want   string // the error after `keys[0] (id "x"): `
	}{
		{"ip not an address", `"allow_ips": ["not-an-ip"]`, `"allow_ips": "not-an-ip" is not an IP address or CIDR prefix`},
		{"ip prefix too long", `"allow_ips": ["10.0.0.0/33"]`, `"allow_ips": "10.0.0.0/33" is not a CIDR prefix`},
		{"ips empty", `"allow_ips": []`, `"allow_ips" is empty; leave it out to allow any address`},
		{"ips one bad of two", `"allow_ips": ["10.0.0.0/8", "10.0.0.0.1"]`, `"allow_ips": "10.0.0.0.1" is not an IP address or CIDR prefix`},
		{"path relative", `"allow_paths": ["relative"]`, `"allow_paths": "relative": a path pattern starts with /`},
		{"paths empty", `"allow_paths": []`, `"allow_paths" is empty; leave it out to allow any`},
		{"method with a space", `"allow_methods": ["GE T"]`, `"allow_methods": "GE T" is not a method`},
		{"referrer empty", `"allow_referrers": [""]`, `"allow_referrers": "": empty or not printable ASCII`},
		{"referrer with a space", `"allow_referrers": ["https://a b/"]`, `"allow_referrers": "https://a b/": empty or not printable ASCII`},
		{"referrer host glob inside", `"allow_referrers": ["https://a.*.example.com/"]`, `"allow_referrers": "https://a.*.example.com/": a host may only start with`},
		{"referrer query", `"allow_referrers": ["https://example.com/?x=*"]`, `"allow_referrers": "https://example.com/?x=*": only scheme, host and path`},
		{"quota period", `"quota": "5/fortnight"`, `"quota": quota "5/fortnight": period must be hour, day, week or month`},
		{"quota count", `"quota": "0/day"`, `"quota": quota "0/day": count must be a whole number`},
		{"expires not a time", `"expires": "tomorrow"`, `"expires": "tomorrow" is not an RFC 3339 time`},
		{"not_before a date only", `"not_before": "2030-01-01"`, `"not_before": "2030-01-01" is not an RFC 3339 time`},
		{"expires before not_before", `"not_before": "2031-01-01T00:00:00Z", "expires": "2030-01-01T00:00:00Z"`, `"expires" is not after "not_before"`},
		{"expires at not_before", `"not_before": "2030-01-01T00:00:00Z", "expires": "2030-01-01T01:00:00+01:00"`, `"expires" is not after "not_before"`},
		{"plan name", `"plan": "two words"`, `"plan": plan name "two words": use 1 to 64 letters`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := `{"keys": [{"id": "x", "hash": "` + hash1 + `", ` + tt.fields + `}]}`
			_, err := parseKeysFile([]byte(data))
			if want := `keys[0] (id "x"): ` + tt.want; err == nil || !strings.HasPrefix(err.Error(), want) {
				t.Fatalf("parseKeysFile error = %v, want it to start with %q", err, want)
			}
		})
	}

	t.Run("second entry", func(t *testing.T) {
		data := `{"keys": [{"id": "ok", "hash": "` + hash1 + `"}, {"id": "y", "hash": "` + hash2 + `", "allow_ips": ["nope"]}]}`
		want := `keys[1] (id "y"): "allow_ips": "nope" is not an IP address or CIDR prefix`
		if _, err := parseKeysFile([]byte(data)); err == nil || err.Error() != want {
			t.Fatalf("parseKeysFile error = %v, want %q", err, want)
		}
	})

	t.Run("provision names the file", func(t *testing.T) {
		path := polKeysFile(t, polEntry("x", "quota", "5/fortnight"))
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		defer cancel()
		h := &Handler{KeysFile: path, QuotaFile: polQuotaFile(t)}
		err := h.Provision(ctx)
		if cerr := h.Cleanup(); cerr != nil {
			t.Errorf("Cleanup: %v", cerr)
		}
		want := "loading keys file " + path + `: keys[0] (id "x"): "quota": quota "5/fortnight": period must be`
		if err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Fatalf("Provision error = %v, want it to start with %q", err, want)
		}
	})
}

func TestCompilePlan(t *testing.T) {
	tests := []struct {
		name    string
		plan    string
		p       *Plan
		wantErr string
		check   func(t *testing.T, cp *plan)
	}{
		{name: "burst without rate", plan: "p", p: &Plan{Burst: 5}, wantErr: "plan p: burst needs a rate"},
		{name: "burst with rate off", plan: "p", p: &Plan{Rate: "off", Burst: 5}, wantErr: "plan p: burst makes no sense with rate off"},
		{name: "bad burst", plan: "p", p: &Plan{Rate: "10/1m", Burst: -1}, wantErr: "plan p: burst: burst must be a whole number"},
		{name: "bad rate count", plan: "p", p: &Plan{Rate: "ten/1m"}, wantErr: `plan p: rate "ten/1m": count must be`},
		{name: "bad rate form", plan: "p", p: &Plan{Rate: "10"}, wantErr: `plan p: rate "10": want <count>/<duration>`},
		{name: "bad quota period", plan: "p", p: &Plan{Quota: "3/fortnight"}, wantErr: `plan p: quota "3/fortnight": period must be hour, day, week or month`},
		{name: "bad quota form", plan: "p", p: &Plan{Quota: "lots"}, wantErr: `plan p: quota "lots": want <count>/<period>`},
		{name: "bad restriction", plan: "p", p: &Plan{Restrictions: Restrictions{AllowIPs: []string{"x"}}}, wantErr: `plan p: "allow_ips": "x" is not an IP address or CIDR prefix`},
		{name: "empty restriction", plan: "p", p: &Plan{Restrictions: Restrictions{AllowMethods: []string{}}}, wantErr: `plan p: "allow_methods" is empty`},
		{name: "bad name", plan: "two words", p: &Plan{}, wantErr: `plan name "two words": use 1 to 64 letters`},
		{name: "empty name", plan: "", p: &Plan{}, wantErr: `plan name "": use 1 to 64 letters`},
		{name: "long name", plan: strings.Repeat("n", 65), p: &Plan{}, wantErr: `plan name "nnn`},
		{name: "nil plan", plan: "p", check: func(t *testing.T, cp *plan) {
			if cp.limitMode != limitInherit || cp.quotaMode != limitInherit || !cp.restr.isZero() {
				t.Errorf("nil plan compiled to %+v, want everything inherited", cp)
			}
		}},
		{name: "rate and burst", plan: "p", p: &Plan{Rate: "10/1s", Burst: 3}, check: func(t *testing.T, cp *plan) {
			if want := (ratelimit.Limit{Count: 10, Period: time.Second, Burst: 3}); cp.limitMode != limitOwn || cp.limit != want {
				t.Errorf("limit = %v %+v, want own %+v", cp.limitMode, cp.limit, want)
			}
			if cp.policy.header != `"plan";q=10;w=1` {
				t.Errorf("policy = %q", cp.policy.header)
			}
		}},
		{name: "off", plan: "p", p: &Plan{Rate: "off", Quota: "off"}, check: func(t *testing.T, cp *plan) {
			if cp.limitMode != limitOff || cp.quotaMode != limitOff {
				t.Errorf("modes = %v %v, want off", cp.limitMode, cp.quotaMode)
			}
		}},
		{name: "quota and restrictions", plan: "a-b.C_9", p: &Plan{Quota: "5/week", Restrictions: Restrictions{AllowMethods: []string{"get"}, AllowIPs: []string{"::ffff:10.0.0.1"}}}, check: func(t *testing.T, cp *plan) {
			if want := (quota.Quota{Count: 5, Period: quota.Week}); cp.quotaMode != limitOwn || cp.quota != want {
				t.Errorf("quota = %v %+v, want own %+v", cp.quotaMode, cp.quota, want)
			}
			if !slices.Equal(cp.restr.methods, []string{"GET"}) || len(cp.restr.ips) != 1 || cp.restr.ips[0].String() != "10.0.0.1/32" {
				t.Errorf("restrictions = %+v", cp.restr)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cp, err := compilePlan(tt.plan, tt.p)
			if tt.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
					t.Fatalf("compilePlan error = %v, want it to start with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("compilePlan: %v", err)
			}
			if cp.name != tt.plan {
				t.Errorf("name = %q, want %q", cp.name, tt.plan)
			}
			tt.check(t, cp)
		})
	}

	t.Run("provision", func(t *testing.T) {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		defer cancel()
		h := &Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, Plans: map[string]*Plan{"p": {Burst: 5}}}
		err := h.Provision(ctx)
		if cerr := h.Cleanup(); cerr != nil {
			t.Errorf("Cleanup: %v", cerr)
		}
		if want := "plan p: burst needs a rate"; err == nil || err.Error() != want {
			t.Fatalf("Provision error = %v, want %q", err, want)
		}
	})
}

// polInlineRecord returns the record of an inline key of h.
func polInlineRecord(t *testing.T, h *Handler, key string) *keyRecord {
	t.Helper()
	rec := h.inline[sha256.Sum256([]byte(key))]
	if rec == nil {
		t.Fatal("inline key not found")
	}
	return rec
}

// TestQuota checks the headers of a handler's quota, the 429 once it is
// used up, and that a request refused by the quota reaches nothing.
func TestQuota(t *testing.T) {
	midnight := polSecsToMidnight(t)
	ok := func(policy, rate string) polStep { return polStep{http.StatusOK, outcomeOK, policy, rate, ""} }
	over := func(policy, rate string) polStep {
		return polStep{http.StatusTooManyRequests, outcomeQuotaExceeded, policy, rate, polMidnight}
	}
	tests := []struct {
		name  string
		rate  string
		steps []polStep
	}{
		{"quota alone", "", []polStep{
			ok(`"quota";q=3;w=86400`, `"quota";r=2;t={M}`),
			ok(`"quota";q=3;w=86400`, `"quota";r=1;t={M}`),
			ok(`"quota";q=3;w=86400`, `"quota";r=0;t={M}`),
			over(`"quota";q=3;w=86400`, `"quota";r=0;t={M}`),
			over(`"quota";q=3;w=86400`, `"quota";r=0;t={M}`),
		}},
		{"quota and rate", "100/1m", []polStep{
			ok(`"default";q=100;w=60, "quota";q=3;w=86400`, `"default";r=99;t=1, "quota";r=2;t={M}`),
			ok(`"default";q=100;w=60, "quota";q=3;w=86400`, `"default";r=98;t=2, "quota";r=1;t={M}`),
			ok(`"default";q=100;w=60, "quota";q=3;w=86400`, `"default";r=97;t=2, "quota";r=0;t={M}`),
			over(`"quota";q=3;w=86400`, `"quota";r=0;t={M}`),
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestHandler(t, &Handler{
				Keys:      []InlineKey{{ID: "alpha", Key: testKeyA}},
				Rate:      tt.rate,
				Quota:     "3/day",
				QuotaFile: polQuotaFile(t),
			})
			clock := &fakeClock{}
			clock.advance(time.Hour)
			h.limiter = newLimiter(clock.now)
			for i, s := range tt.steps {
				res := polServe(t, h, polReq{key: testKeyA})
				res.check(t, polWant{status: s.status, outcome: s.outcome, id: "alpha"})
				polHeader(t, res.p.w.hdr, "RateLimit-Policy", s.policy, midnight)
				polHeader(t, res.p.w.hdr, "RateLimit", s.rate, midnight)
				polHeader(t, res.p.w.hdr, "Retry-After", s.retry, midnight)
				if t.Failed() {
					t.Fatalf("request %d failed", i+1)
				}
			}
			rec := polInlineRecord(t, h, testKeyA)
			if d := h.quotas.store.Load().Peek(quotaName(rec), h.defaultQuota); d.Used != 3 || d.Allowed {
				t.Errorf("quota counter = %+v, want 3 used and no more allowed", d)
			}
		})
	}

	t.Run("inline and keys-file keys", func(t *testing.T) {
		path := polKeysFile(t, polEntry("f"))
		h := newTestHandler(t, &Handler{
			KeysFile:  path,
			Keys:      []InlineKey{{ID: "alpha", Key: testKeyA}},
			Quota:     "1/hour",
			QuotaFile: polQuotaFile(t),
		})
		for _, c := range []struct{ id, key string }{{"alpha", testKeyA}, {"f", polKey("f")}} {
			polServe(t, h, polReq{key: c.key}).check(t, polWant{status: http.StatusOK, outcome: outcomeOK, id: c.id})
			res := polServe(t, h, polReq{key: c.key})
			res.check(t, polWant{status: http.StatusTooManyRequests, outcome: outcomeQuotaExceeded, id: c.id})
			if got := res.p.w.hdr.Get("RateLimit-Policy"); got != `"quota";q=1;w=3600` {
				t.Errorf("RateLimit-Policy = %q", got)
			}
		}
	})
}

// TestQuotaAndRateLimitSpendNothingOnRefusal checks that a request refused
// by the rate limit counts nothing against the quota, and one refused by
// the quota spends no rate token.
func TestQuotaAndRateLimitSpendNothingOnRefusal(t *testing.T) {
	midnight := polSecsToMidnight(t)
	t.Run("rate limited uses no quota", func(t *testing.T) {
		h := newTestHandler(t, &Handler{
			Keys:      []InlineKey{{ID: "alpha", Key: testKeyA}},
			Rate:      "1/1m",
			Quota:     "5/day",
			QuotaFile: polQuotaFile(t),
		})
		clock := &fakeClock{}
		clock.advance(time.Hour)
		h.limiter = newLimiter(clock.now)
		steps := []polStep{
			{http.StatusOK, outcomeOK, `"default";q=1;w=60, "quota";q=5;w=86400`, `"default";r=0;t=60, "quota";r=4;t={M}`, ""},
			{http.StatusTooManyRequests, outcomeRateLimited, `"default";q=1;w=60, "quota";q=5;w=86400`, `"default";r=0;t=60, "quota";r=4;t={M}`, "60"},
			{http.StatusTooManyRequests, outcomeRateLimited, `"default";q=1;w=60, "quota";q=5;w=86400`, `"default";r=0;t=60, "quota";r=4;t={M}`, "60"},
		}
		var admitted int64
		for i, s := range steps {
			res := polServe(t, h, polReq{key: testKeyA})
			res.check(t, polWant{status: s.status, outcome: s.outcome, id: "alpha"})
			polHeader(t, res.p.w.hdr, "RateLimit-Policy", s.policy, midnight)
			polHeader(t, res.p.w.hdr, "RateLimit", s.rate, midnight)
			polHeader(t, res.p.w.hdr, "Retry-After", s.retry, midnight)
			admitted += res.next.calls.Load()
			if t.Failed() {
				t.Fatalf("request %d failed", i+1)
			}
		}
		if admitted != 1 {
			t.Errorf("admitted %d requests, want 1", admitted)
		}
		rec := polInlineRecord(t, h, testKeyA)
		if d := h.quotas.store.Load().Peek(quotaName(rec), h.defaultQuota); d.Used != 1 || d.Remaining != 4 {
			t.Errorf("quota counter = %+v, want 1 used, 4 remaining", d)
		}
	})

	t.Run("over quota spends no rate token", func(t *testing.T) {
		h := newTestHandler(t, &Handler{
			Keys:      []InlineKey{{ID: "alpha", Key: testKeyA}},
			Rate:      "2/1m",
			Quota:     "1/day",
			QuotaFile: polQuotaFile(t),
		})
		clock := &fakeClock{}
		clock.advance(time.Hour)
		h.limiter = newLimiter(clock.now)
		polServe(t, h, polReq{key: testKeyA}).check(t, polWant{status: http.StatusOK, outcome: outcomeOK, id: "alpha"})
		for range 3 {
			polServe(t, h, polReq{key: testKeyA}).check(t, polWant{status: http.StatusTooManyRequests, outcome: outcomeQuotaExceeded, id: "alpha"})
		}
		rec := polInlineRecord(t, h, testKeyA)
		if d := h.limiter.decide(nil, &rec.digest, h.defaultLimit, 0); !d.Allowed || d.Remaining != 0 {
			t.Errorf("rate limit after one admitted request = %+v, want the second of two tokens still there", d)
		}
	})
}

// TestPrefixFormatCheck checks that a key carrying a declared prefix but
// failing its checksum is refused without a lookup (the cache is never
// asked), while well-formed keys and keys of no declared prefix
// are looked up as usual, whatever the order of overlapping prefixes.
func TestPrefixFormatCheck(t *testing.T) {
	live, err := keyformat.Generate("sk_live")
	if err != nil {
		t.Fatal(err)
	}
	short, err := keyformat.Generate("sk")
	if err != nil {
		t.Fatal(err)
	}
	// changeOne changes one character of the random part of key to another
	// base62 character, which the checksum must catch.
	changeOne := func(key, prefix string) string {
		const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
		i := len(prefix) + 1 + rand.IntN(keyformat.RandomLen)
		b := []byte(key)
		for b[i] == key[i] {
			b[i] = alphabet[rand.IntN(len(alphabet))]
		}
		return string(b)
	}
	liveBad, shortBad := changeOne(live, "sk_live"), changeOne(short, "sk")
	if !keyformat.Check(live, "sk_live") || keyformat.Check(liveBad, "sk_live") || !keyformat.Check(short, "sk") || keyformat.Check(shortBad, "sk") {
		t.Fatal("keyformat does not tell the keys of this test apart; it would prove nothing")
	}
	const other = "other_inline_key_0123456789"

	tests := []struct {
		name     string
		key      string
		id       string // "" for invalid
		lookedUp bool   // whether the key is looked up
	}{
		{"sk_live key", live, "live", true},
		{"sk_live key, one character changed", liveBad, "", false},
		{"sk_live key, truncated", live[:len(live)-1], "", false},
		{"sk key", short, "short", true},
		{"sk key, one character changed", shortBad, "", false},
		{"declared prefix, not the format", "sk_live_short", "", false},
		{"undeclared prefix, unknown", "other_unknown_key_0123456789", "", true},
		{"undeclared prefix, inline key", other, "other", true},
	}
	for _, prefixes := range [][]string{{"sk_live", "sk"}, {"sk", "sk_live"}} {
		t.Run(strings.Join(prefixes, ","), func(t *testing.T) {
			h := newTestHandler(t, &Handler{
				Prefixes: prefixes,
				Keys:     []InlineKey{{ID: "live", Key: live}, {ID: "short", Key: short}, {ID: "other", Key: other}},
			})
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					want := polWant{status: http.StatusUnauthorized, outcome: outcomeInvalid, challenge: polBadChallenge}
					if tt.id != "" {
						want = polWant{status: http.StatusOK, outcome: outcomeOK, id: tt.id}
					}
					// A key that is looked up asks the cache first (a hit
					// or a miss is counted); one turned away by its
					// format is never looked up.
					hits, misses := since(apiKeyMetrics.cacheHits), since(apiKeyMetrics.cacheMisses)
					polServe(t, h, polReq{key: tt.key}).check(t, want)
					wantLookups := 0.0
					if tt.lookedUp {
						wantLookups = 1
					}
					if lookups := hits() + misses(); lookups != wantLookups {
						t.Errorf("cache lookups: %v, want %v", lookups, wantLookups)
					}
				})
			}
		})
	}
}

// A Referer pattern is matched on the parsed URL: the host part of a
// pattern can only match the Referer's host, never a path, query,
// fragment or user info that happens to hold the same text.
func TestMatchReferrer(t *testing.T) {
	compile := func(ps ...string) []referrerPattern {
		var out []referrerPattern
		for _, s := range ps {
			p, err := parseReferrerPattern(s)
			if err != nil {
				t.Fatalf("parseReferrerPattern(%q): %v", s, err)
			}
			out = append(out, p)
		}
		return out
	}
	sub := compile("https://*.example.com/*")
	tests := []struct {
		name     string
		patterns []referrerPattern
		ref      string
		want     bool
	}{
		{"subdomain", sub, "https://app.example.com/page", true},
		{"deeper subdomain", sub, "https://a.b.example.com/", true},
		{"upper case host", sub, "https://APP.Example.COM/x", true},
		{"port on the referer", sub, "https://app.example.com:8443/x", true},
		{"bare domain", sub, "https://example.com/", false},
		{"other scheme", sub, "http://app.example.com/", false},
		{"host in the path", sub, "https://evil.com/.example.com/", false},
		{"host in the query", sub, "https://evil.com/?x=.example.com/", false},
		{"host in the fragment", sub, "https://evil.com#.example.com/", false},
		{"user info", sub, "https://app.example.com@evil.com/", false},
		{"suffix without dot", sub, "https://evilexample.com/", false},
		{"empty", sub, "", false},
		{"not a URL", sub, "::::", false},
		{"no scheme pattern, http", compile("*.example.com"), "http://a.example.com/anything?q=1", true},
		{"no scheme pattern, ftp", compile("*.example.com"), "ftp://a.example.com/", false},
		{"exact host, path prefix glob", compile("https://docs.example.com/api/*"), "https://docs.example.com/api/v1", true},
		{"exact host, other path", compile("https://docs.example.com/api/*"), "https://docs.example.com/blog", false},
		{"pattern with port", compile("http://localhost:3000/*"), "http://localhost:3000/x", true},
		{"pattern with port, other port", compile("http://localhost:3000/*"), "http://localhost:4000/x", false},
		{"any host", compile("https://*"), "https://anything.test/", true},
		{"second pattern", compile("https://a.test/*", "https://b.test/*"), "https://b.test/x", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := matchReferrer(tt.patterns, tt.ref); got != tt.want {
				t.Errorf("matchReferrer(%q) = %v, want %v", tt.ref, got, tt.want)
			}
		})
	}
}

func TestMatchPathsDotDotSemicolon(t *testing.T) {
	for _, p := range []string{"/v1/reports/..;/admin", "/v1/..;", "/v1/reports/..;x"} {
		if matchPaths([]string{"/v1/reports", "/v1"}, p) {
			t.Errorf("matchPaths(%q) = true, want false", p)
		}
	}
	if !matchPaths([]string{"/v1"}, "/v1/a;b") {
		t.Error(`matchPaths("/v1/a;b") = false: a plain ";" is allowed`)
	}
}
