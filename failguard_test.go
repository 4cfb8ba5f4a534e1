package apikey

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

func TestFailGuard(t *testing.T) {
	var clock fakeClock
	clock.advance(time.Hour)
	g := newFailGuard(ratelimit.Limit{Count: 3, Period: time.Minute, Burst: 3}, clock.now)
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	for i := range 3 {
		if blocked, _ := g.blocked(a); blocked {
			t.Fatalf("blocked after %d failures, want 3 allowed", i)
		}
		g.fail(a)
	}
	blocked, retry := g.blocked(a)
	if !blocked || retry <= 0 || retry > 20*time.Second {
		t.Fatalf("after 3 failures: blocked %v, retry %v; want blocked for up to 20s", blocked, retry)
	}
	if blocked, _ := g.blocked(b); blocked {
		t.Fatal("another address is blocked too")
	}
	clock.advance(retry)
	if blocked, _ := g.blocked(a); blocked {
		t.Fatal("still blocked after the retry time")
	}
	clock.advance(time.Hour)
	g.sweep()
	if n := g.len(); n != 0 {
		t.Fatalf("%d addresses held after their failures ran out, want 0", n)
	}
}

// However many addresses fail, the guard holds a bounded number.
func TestFailGuardBounded(t *testing.T) {
	var clock fakeClock
	g := newFailGuard(ratelimit.Limit{Count: 20, Period: time.Minute, Burst: 20}, clock.now)
	for i := range 200_000 {
		g.fail(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}))
	}
	if n, limit := g.len(), failGuardShards*failGuardPerShard; n > limit {
		t.Fatalf("%d addresses held, want at most %d", n, limit)
	}
}

// An address that fails too often gets 429 too_many_failures for any key,
// valid ones included, with no lookup; other addresses are unaffected.
func TestFailGuardServeHTTP(t *testing.T) {
	h := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "a", Key: hashOf(testKeyA)}}, MaxFailures: "3/1m"})
	serve := func(ip, key string) (int, string, prepared) {
		p := prepare("/", http.Header{"X-Api-Key": {key}})
		caddyhttp.SetVar(p.r.Context(), caddyhttp.ClientIPVarKey, ip)
		err := h.ServeHTTP(p.w, p.r, &nextRecorder{})
		status := 200
		if he, ok := err.(caddyhttp.HandlerError); ok {
			status = he.StatusCode
		}
		outcome, _ := p.repl.GetString("http.api_key.outcome")
		return status, outcome, p
	}
	for i := range 3 {
		if status, outcome, _ := serve("198.51.100.7", fmt.Sprint("guess-", i)); status != 401 || outcome != outcomeInvalid {
			t.Fatalf("guess %d: %d %s, want 401 invalid", i, status, outcome)
		}
	}
	misses := since(apiKeyMetrics.cacheMisses)
	status, outcome, p := serve("198.51.100.7", testKeyA)
	if status != 429 || outcome != outcomeTooManyFailures || p.w.hdr.Get("Retry-After") == "" {
		t.Fatalf("valid key from the guessing address: %d %s Retry-After %q; want 429 too_many_failures with Retry-After",
			status, outcome, p.w.hdr.Get("Retry-After"))
	}
	if f := logFieldOf(t, p); f["outcome"] != outcomeTooManyFailures {
		t.Errorf("log field = %v", f)
	}
	if misses() != 0 {
		t.Errorf("a blocked request looked its key up")
	}
	if status, _, _ := serve("198.51.100.8", testKeyA); status != 200 {
		t.Errorf("another address: %d, want 200", status)
	}
	// A missing key is not a guess.
	h2 := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "a", Key: hashOf(testKeyA)}}, MaxFailures: "1/1m"})
	for range 3 {
		p := prepare("/", nil)
		caddyhttp.SetVar(p.r.Context(), caddyhttp.ClientIPVarKey, "198.51.100.9")
		_ = h2.ServeHTTP(p.w, p.r, &nextRecorder{})
	}
	if h2.guard.len() != 0 {
		t.Errorf("requests without a key were counted as failures")
	}

	off := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "a", Key: hashOf(testKeyA)}}, MaxFailures: "off"})
	if off.guard != nil {
		t.Error("max_failures off still has a guard")
	}
}

func TestMaxFailuresCaddyfile(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{"max_failures 50/10m", "50/10m", ""},
		{"max_failures off", "off", ""},
		{"max_failures many", "", `max_failures: rate "many"`},
		{"max_failures 5/1m x", "", `max_failures: unexpected argument "x"`},
	} {
		t.Run(tc.in, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("api_key {\n\tkeys_file k.json\n\t" + tc.in + "\n}"))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || h.MaxFailures != tc.want {
				t.Fatalf("MaxFailures = %q, %v; want %q", h.MaxFailures, err, tc.want)
			}
		})
	}
}
