package apikey

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap/zapcore"

	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// Keys used by the tests in this file, with their ids.
const (
	testKeyA = "test_key_alpha_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKL" // 64 bytes
	testKeyB = "test_key_bravo"
)

// TestMain quiets the development logger that caddy.Context gives modules
// provisioned outside a config (it writes to os.Stderr, with a stack trace
// for every warning); APIKEY_TEST_LOGS=1 keeps it. The end-to-end tests
// send Caddy's logs to files of their own.
func TestMain(m *testing.M) {
	if os.Getenv("APIKEY_TEST_LOGS") == "" {
		if null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0); err == nil {
			os.Stderr = null
		}
	}
	// Quota stores go under Caddy's data directory: a fresh one, so
	// that tests neither read nor lock a real one.
	data, err := os.MkdirTemp("", "apikey-test-data-")
	if err != nil {
		panic(err)
	}
	os.Setenv("XDG_DATA_HOME", data)
	code := m.Run()
	os.RemoveAll(data)
	os.Exit(code)
}

// newTestHandler provisions h as Caddy would and cleans it up after the
// test. It returns the handler and the context's cancel.
func newTestHandler(t testing.TB, h *Handler) *Handler {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if err := h.Provision(ctx); err != nil {
		cancel()
		t.Fatalf("Provision: %v", err)
	}
	if err := h.Validate(); err != nil {
		cancel()
		t.Fatalf("Validate: %v", err)
	}
	t.Cleanup(func() {
		if err := h.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
		cancel()
	})
	return h
}

// prepared is a request made ready as Caddy's server makes it before the
// first handler runs: a replacer with the HTTP placeholders, vars and
// ExtraLogFields in the context.
type prepared struct {
	r     *http.Request
	w     *testWriter
	repl  *caddy.Replacer
	extra *caddyhttp.ExtraLogFields
}

type testWriter struct {
	hdr    http.Header
	status int
}

func (w *testWriter) Header() http.Header         { return w.hdr }
func (w *testWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *testWriter) WriteHeader(status int)      { w.status = status }

// testServer has an error route (handle_errors), so that the handler
// returns its refusals as errors, which the unit tests check; without
// one it writes them itself (TestRefusedWithoutErrorRoutes).
var testServer = &caddyhttp.Server{Errors: &caddyhttp.HTTPErrorConfig{Routes: caddyhttp.RouteList{{}}}}

func prepare(target string, header http.Header) prepared {
	return prepareOn(testServer, target, header)
}

// prepareOn is prepare for a request to the server srv.
func prepareOn(srv *caddyhttp.Server, target string, header http.Header) prepared {
	r := httptest.NewRequest(http.MethodGet, target, nil)
	for k, v := range header {
		r.Header[k] = v
	}
	w := &testWriter{hdr: make(http.Header)}
	repl := caddy.NewReplacer()
	r = caddyhttp.PrepareRequest(r, repl, w, srv)
	extra := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields)
	return prepared{r: r, w: w, repl: repl, extra: extra}
}

// nextRecorder is the next handler; it counts calls and keeps the last
// request it saw.
type nextRecorder struct {
	calls atomic.Int64
	mu    sync.Mutex
	last  *http.Request
}

func (n *nextRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	n.calls.Add(1)
	n.mu.Lock()
	n.last = r
	n.mu.Unlock()
	return nil
}

func hashOf(key string) string {
	sum := sha256.Sum256([]byte(key))
	return fmt.Sprintf("sha256:%x", sum)
}

// logFieldOf returns the api_key log field the handler set, encoded as
// the access log would print it; nil when there is none.
func logFieldOf(t *testing.T, p prepared) map[string]any {
	t.Helper()
	for _, f := range extraFields(p.extra) {
		if f.Key == "api_key" {
			m := zapcore.NewMapObjectEncoder()
			f.AddTo(m)
			obj, _ := m.Fields["api_key"].(map[string]any)
			return obj
		}
	}
	return nil
}

// extraFields reads the fields of an ExtraLogFields, which Caddy keeps
// unexported (its server reads them when it writes the access log).
func extraFields(e *caddyhttp.ExtraLogFields) []zapcore.Field {
	v := reflect.ValueOf(e).Elem().FieldByName("fields")
	return *(*[]zapcore.Field)(unsafe.Pointer(v.UnsafeAddr()))
}

func errorsAs(err error, target *caddyhttp.HandlerError) bool {
	return errors.As(err, target)
}

func TestServeHTTPOutcomes(t *testing.T) {
	h := newTestHandler(t, &Handler{
		Keys: []InlineKey{{ID: "alpha", Key: hashOf(testKeyA)}, {ID: "bravo", Key: testKeyB}},
	})
	tests := []struct {
		name        string
		header      http.Header
		wantStatus  int
		wantOutcome string
		wantID      string
		wantChall   string
	}{
		{"bearer", http.Header{"Authorization": {"Bearer " + testKeyA}}, 0, "ok", "alpha", ""},
		{"bearer lowercase scheme", http.Header{"Authorization": {"bearer " + testKeyB}}, 0, "ok", "bravo", ""},
		{"header", http.Header{"X-Api-Key": {testKeyB}}, 0, "ok", "bravo", ""},
		{"same key twice", http.Header{"Authorization": {"Bearer " + testKeyA}, "X-Api-Key": {testKeyA}}, 0, "ok", "alpha", ""},
		{"missing", nil, 401, "missing", "", `Bearer realm="api"`},
		{"basic is not a key", http.Header{"Authorization": {"Basic dXNlcjpwYXNz"}}, 401, "missing", "", `Bearer realm="api"`},
		{"unknown", http.Header{"X-Api-Key": {"nope"}}, 401, "invalid", "", `Bearer realm="api", error="invalid_token"`},
		{"two keys", http.Header{"Authorization": {"Bearer " + testKeyA}, "X-Api-Key": {testKeyB}}, 401, "invalid", "", `Bearer realm="api", error="invalid_token"`},
		{"two header values", http.Header{"X-Api-Key": {testKeyA, testKeyB}}, 401, "invalid", "", `Bearer realm="api", error="invalid_token"`},
		{"empty bearer", http.Header{"Authorization": {"Bearer "}}, 401, "invalid", "", `Bearer realm="api", error="invalid_token"`},
		{"too long", http.Header{"X-Api-Key": {strings.Repeat("k", 513)}}, 401, "invalid", "", `Bearer realm="api", error="invalid_token"`},
		{"control byte", http.Header{"X-Api-Key": {"abc\x01def"}}, 401, "invalid", "", `Bearer realm="api", error="invalid_token"`},
		{"non-ASCII", http.Header{"X-Api-Key": {"ключ"}}, 401, "invalid", "", `Bearer realm="api", error="invalid_token"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var next nextRecorder
			p := prepare("/", tt.header)
			err := h.ServeHTTP(p.w, p.r, &next)
			if tt.wantStatus == 0 {
				if err != nil {
					t.Fatalf("ServeHTTP: %v", err)
				}
				if next.calls.Load() != 1 {
					t.Fatalf("next called %d times, want 1", next.calls.Load())
				}
			} else {
				var he caddyhttp.HandlerError
				if !errorsAs(err, &he) || he.StatusCode != tt.wantStatus {
					t.Fatalf("err = %v, want HandlerError %d", err, tt.wantStatus)
				}
				if next.calls.Load() != 0 {
					t.Fatalf("next called on a rejected request")
				}
				if got := p.w.hdr.Get("WWW-Authenticate"); got != tt.wantChall {
					t.Errorf("WWW-Authenticate = %q, want %q", got, tt.wantChall)
				}
			}
			if got, _ := p.repl.GetString("http.api_key.outcome"); got != tt.wantOutcome {
				t.Errorf("outcome placeholder = %q, want %q", got, tt.wantOutcome)
			}
			if got, _ := p.repl.GetString("http.auth.user.id"); got != tt.wantID {
				t.Errorf("http.auth.user.id = %q, want %q", got, tt.wantID)
			}
			if tt.wantID != "" {
				if got := caddyhttp.GetVar(p.r.Context(), "http.auth.user.id"); got != tt.wantID {
					t.Errorf("var http.auth.user.id = %v, want %q", got, tt.wantID)
				}
			}
			f := logFieldOf(t, p)
			if f["outcome"] != tt.wantOutcome {
				t.Errorf("log field outcome = %v, want %q", f["outcome"], tt.wantOutcome)
			}
			if id, _ := f["id"].(string); id != tt.wantID {
				t.Errorf("log field id = %q, want %q", id, tt.wantID)
			}
		})
	}
}

// fakeClock is a clock the tests move by hand.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) now() int64              { return c.ns.Load() }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// newClockedLimiter returns a limiter that reads a fake clock, an hour on
// from zero, and the clock.
func newClockedLimiter() (*limiter, *fakeClock) {
	clock := &fakeClock{}
	clock.advance(time.Hour)
	return newLimiter(clock.now), clock
}

func TestServeHTTPRateLimit(t *testing.T) {
	h := newTestHandler(t, &Handler{
		Keys: []InlineKey{{ID: "alpha", Key: testKeyA}},
		Rate: "3/1m",
	})
	clock := &fakeClock{}
	clock.advance(time.Hour)
	h.limiter = newLimiter(clock.now)
	hdr := http.Header{"X-Api-Key": {testKeyA}}

	type step struct {
		advance    time.Duration
		wantStatus int
		wantRate   string
		wantRetry  string
	}
	steps := []step{
		{0, 0, `"default";r=2;t=20`, ""},
		{0, 0, `"default";r=1;t=40`, ""},
		{0, 0, `"default";r=0;t=60`, ""},
		{0, 429, `"default";r=0;t=60`, "20"},
		{19 * time.Second, 429, `"default";r=0;t=41`, "1"},
		{time.Second, 0, `"default";r=0;t=60`, ""},
		{60 * time.Second, 0, `"default";r=2;t=20`, ""},
	}
	for i, s := range steps {
		clock.advance(s.advance)
		var next nextRecorder
		p := prepare("/", hdr)
		err := h.ServeHTTP(p.w, p.r, &next)
		var he caddyhttp.HandlerError
		switch {
		case s.wantStatus == 0 && err != nil:
			t.Fatalf("step %d: unexpected error %v", i, err)
		case s.wantStatus != 0 && (!errorsAs(err, &he) || he.StatusCode != s.wantStatus):
			t.Fatalf("step %d: err = %v, want status %d", i, err, s.wantStatus)
		}
		if got := p.w.hdr.Get("RateLimit-Policy"); got != `"default";q=3;w=60` {
			t.Errorf("step %d: RateLimit-Policy = %q", i, got)
		}
		if got := p.w.hdr.Get("RateLimit"); got != s.wantRate {
			t.Errorf("step %d: RateLimit = %q, want %q", i, got, s.wantRate)
		}
		if got := p.w.hdr.Get("Retry-After"); got != s.wantRetry {
			t.Errorf("step %d: Retry-After = %q, want %q", i, got, s.wantRetry)
		}
		if got := p.r.Header.Get("X-Api-Key"); got != "" {
			t.Errorf("step %d: the key is still in the request handed on (or to handle_errors)", i)
		}
		if s.wantStatus == 429 {
			if got, _ := p.repl.GetString("http.api_key.outcome"); got != outcomeRateLimited {
				t.Errorf("step %d: outcome = %q", i, got)
			}
			if f := logFieldOf(t, p); f["outcome"] != outcomeRateLimited || f["id"] != "alpha" {
				t.Errorf("step %d: log field = %v", i, f)
			}
		}
	}
}

func TestLimitOf(t *testing.T) {
	own := ratelimit.Limit{Count: 5, Period: time.Second, Burst: 2}
	tests := []struct {
		name       string
		handler    string
		burst      int64
		rec        *keyRecord
		wantLimit  ratelimit.Limit
		wantPolicy string
	}{
		{"inherit", "600/1m", 0, &keyRecord{}, ratelimit.Limit{Count: 600, Period: time.Minute, Burst: 600}, `"default";q=600;w=60`},
		{"inherit with handler burst", "600/1m", 50, &keyRecord{}, ratelimit.Limit{Count: 600, Period: time.Minute, Burst: 50}, `"default";q=600;w=60`},
		{"key burst over handler rate", "600/1m", 50, &keyRecord{burst: 7}, ratelimit.Limit{Count: 600, Period: time.Minute, Burst: 7}, `"default";q=600;w=60`},
		{"key burst without any rate", "", 0, &keyRecord{burst: 7}, ratelimit.Limit{}, ""},
		{"own", "600/1m", 0, &keyRecord{limitMode: limitOwn, limit: own, policy: policyValue("key", own)}, own, `"key";q=5;w=1`},
		{"off", "600/1m", 0, &keyRecord{limitMode: limitOff}, ratelimit.Limit{}, ""},
		{"no rate anywhere", "", 0, &keyRecord{}, ratelimit.Limit{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, Rate: tt.handler, Burst: tt.burst})
			lim, pol := h.limitOf(tt.rec, nil)
			var got string
			if pol != nil && lim.Count != 0 {
				got = pol.header
			}
			if lim != tt.wantLimit || got != tt.wantPolicy {
				t.Errorf("limitOf = %+v %q, want %+v %q", lim, got, tt.wantLimit, tt.wantPolicy)
			}
		})
	}
}

// TestRateLimitConcurrent sends 100 requests with one key at once against
// rate 10/1m: exactly 10 go through.
func TestRateLimitConcurrent(t *testing.T) {
	h := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: "10/1m"})
	h.limiter = newLimiter(monoNow)
	var next nextRecorder
	var limited atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 100 {
		p := prepare("/", http.Header{"Authorization": {"Bearer " + testKeyA}})
		wg.Go(func() {
			<-start
			var he caddyhttp.HandlerError
			if err := h.ServeHTTP(p.w, p.r, &next); errorsAs(err, &he) && he.StatusCode == 429 {
				limited.Add(1)
			} else if err != nil {
				t.Errorf("unexpected error %v", err)
			}
		})
	}
	close(start)
	wg.Wait()
	if got := next.calls.Load(); got != 10 {
		t.Errorf("admitted %d requests, want 10", got)
	}
	if got := limited.Load(); got != 90 {
		t.Errorf("limited %d requests, want 90", got)
	}
}

func TestLimiterSweep(t *testing.T) {
	l, clock := newClockedLimiter()
	lim, err := ratelimit.ParseRate("2/1s")
	if err != nil {
		t.Fatal(err)
	}
	digests := make([][32]byte, 1000)
	for i := range digests {
		digests[i] = sha256.Sum256([]byte(fmt.Sprint("key-", i)))
		l.decide(nil, &digests[i], lim, 0)
	}
	if got := l.len(); got != 1000 {
		t.Fatalf("states = %d, want 1000", got)
	}
	if got := l.sweep(); got != 0 {
		t.Fatalf("sweep dropped %d busy states, want 0", got)
	}
	clock.advance(499 * time.Millisecond)
	l.decide(nil, &digests[1], lim, 0) // busy again: must survive the sweep
	clock.advance(2 * time.Millisecond)
	if got := l.sweep(); got != 999 {
		t.Fatalf("sweep dropped %d, want 999", got)
	}
	if got := l.len(); got != 1 {
		t.Fatalf("states after sweep = %d, want 1", got)
	}
}

func TestLimiterStateKeyedByLimit(t *testing.T) {
	l, _ := newClockedLimiter()
	a := ratelimit.Limit{Count: 1, Period: time.Minute, Burst: 1}
	b := ratelimit.Limit{Count: 2, Period: time.Minute, Burst: 2}
	k := sha256.Sum256([]byte("k"))
	other := sha256.Sum256([]byte("other"))
	if !l.decide(nil, &k, a, 0).Allowed || l.decide(nil, &k, a, 0).Allowed {
		t.Fatal("1/1m should admit one request")
	}
	// A changed limit starts afresh; the unchanged one keeps its state.
	if !l.decide(nil, &k, b, 0).Allowed {
		t.Error("a new limit for the key should start with a full burst")
	}
	if l.decide(nil, &k, a, 0).Allowed {
		t.Error("the old limit's state was lost")
	}
	// Another key, even one with the same id elsewhere, has its own.
	if !l.decide(nil, &other, a, 0).Allowed {
		t.Error("another key shared the first key's state")
	}
}

// TestLimiterHeldState checks the state a caller keeps between requests:
// it is the map's state, it is not used for another limit or limiter, and
// once swept it is let go of (so that it is freed) and replaced by the
// map's new one, never kept apart from it.
func TestLimiterHeldState(t *testing.T) {
	l, clock := newClockedLimiter()
	a := ratelimit.Limit{Count: 2, Period: time.Minute, Burst: 2}
	b := ratelimit.Limit{Count: 5, Period: time.Minute, Burst: 5}
	k := sha256.Sum256([]byte("k"))
	var held atomic.Pointer[limitState]
	heldNow := held.Load

	// Held or looked up, a request counts on the one state.
	if d := l.decide(&held, &k, a, 0); !d.Allowed || d.Remaining != 1 {
		t.Fatalf("first = %+v, want allowed with 1 left", d)
	}
	if heldNow() != l.state(&k, a) {
		t.Fatal("decide did not keep the map's state")
	}
	if d := l.decide(nil, &k, a, 0); !d.Allowed || d.Remaining != 0 {
		t.Fatalf("second, by the map = %+v, want allowed with 0 left", d)
	}
	if d := l.decide(&held, &k, a, 0); d.Allowed {
		t.Fatalf("third, held = %+v, want denied", d)
	}

	// Another limit has its own state, and the first keeps its count.
	if d := l.decide(&held, &k, b, 0); !d.Allowed || d.Remaining != 4 {
		t.Fatalf("other limit = %+v, want allowed with 4 left", d)
	}
	if d := l.decide(&held, &k, a, 0); d.Allowed {
		t.Fatalf("first limit again = %+v, want still denied", d)
	}

	// Another limiter does not take this one's state.
	other := newLimiter(clock.now)
	if d := other.decide(&held, &k, a, 0); !d.Allowed || d.Remaining != 1 {
		t.Fatalf("other limiter = %+v, want a fresh state", d)
	}
	if heldNow().owner != other {
		t.Fatal("held state not replaced by the other limiter's")
	}

	// Swept while held: the held state is dead, and the next request
	// counts on the map's new state, which a lookup by the map shares.
	l.decide(&held, &k, a, 0)
	swept := heldNow()
	clock.advance(time.Hour)
	if got := l.sweep(); got != 2 {
		t.Fatalf("sweep dropped %d, want 2", got)
	}
	if swept.tat.Load() != deadTAT {
		t.Fatal("swept state not marked dead")
	}
	if heldNow() != nil {
		t.Fatal("the holder still points at the swept state")
	}
	if d := l.decide(&held, &k, a, 0); !d.Allowed || d.Remaining != 1 {
		t.Fatalf("after sweep = %+v, want a full burst less one", d)
	}
	if heldNow() == swept || heldNow() == nil {
		t.Fatal("the new state is not held")
	}
	if d := l.decide(nil, &k, a, 0); !d.Allowed || d.Remaining != 0 {
		t.Fatalf("by the map after sweep = %+v, want the held state's count", d)
	}
	if got := l.len(); got != 1 {
		t.Fatalf("states = %d, want 1", got)
	}

	// A state swept while a newer one is held leaves the newer one.
	newer := heldNow()
	swept.release()
	if heldNow() != newer {
		t.Error("releasing an old state let go of the newer one")
	}

	// Destruct lets go of every state.
	if err := l.Destruct(); err != nil {
		t.Fatal(err)
	}
	if heldNow() != nil || l.len() != 0 || newer.tat.Load() != deadTAT {
		t.Error("Destruct left a state held, in the map, or alive")
	}
}

// TestLimiterSharedArithmetic checks that limits which count alike (the
// same interval and burst: 10/1s and 600/1m) share a key's state, as
// Redis's counters do, whether found through the map or held for either.
func TestLimiterSharedArithmetic(t *testing.T) {
	l, _ := newClockedLimiter()
	perSecond := ratelimit.Limit{Count: 10, Period: time.Second, Burst: 3}
	perMinute := ratelimit.Limit{Count: 600, Period: time.Minute, Burst: 3}
	k := sha256.Sum256([]byte("k"))
	var held atomic.Pointer[limitState]
	admitted := 0
	for i := range 6 {
		lim := perSecond
		if i%2 == 1 {
			lim = perMinute
		}
		p := &held
		if i%3 == 0 {
			p = nil // by the map
		}
		if l.decide(p, &k, lim, 0).Allowed {
			admitted++
		}
	}
	if admitted != 3 {
		t.Errorf("admitted %d under two limits that count alike, want the one burst of 3", admitted)
	}
	if got := l.len(); got != 1 {
		t.Errorf("states = %d, want 1", got)
	}
}

// TestLimiterSweepRace lets a request admit on an idle state after sweep
// has read it and before it marks it dead: the admission must stand (the
// state stays), not be lost with a dropped state.
func TestLimiterSweepRace(t *testing.T) {
	l, clock := newClockedLimiter()
	lim := ratelimit.Limit{Count: 2, Period: time.Minute, Burst: 2}
	k := sha256.Sum256([]byte("k"))
	var held atomic.Pointer[limitState]
	l.decide(&held, &k, lim, 0)
	clock.advance(time.Hour) // idle again
	l.sweepRaceHook = func(*limitState) {
		// Through the held state: the map's lock is sweep's now.
		if d := l.decide(&held, &k, lim, 0); !d.Allowed {
			t.Errorf("request during the sweep = %+v, want allowed", d)
		}
	}
	got := l.sweep()
	l.sweepRaceHook = nil
	if got != 0 {
		t.Fatalf("sweep dropped %d states, want 0: a request had just used it", got)
	}
	if d := l.decide(nil, &k, lim, 0); !d.Allowed || d.Remaining != 0 {
		t.Fatalf("next = %+v, want allowed with 0 left", d)
	}
	if d := l.decide(&held, &k, lim, 0); d.Allowed {
		t.Fatalf("third = %+v, want denied: the burst is 2", d)
	}
}

// TestRequestHoldsLimitState checks that the request path keeps a key's
// state on its usage record, and that it is the state the limiter's map
// holds for the key.
func TestRequestHoldsLimitState(t *testing.T) {
	h := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: "5/1m"})
	h.limiter = newLimiter(monoNow)
	p := prepare("/", http.Header{"X-Api-Key": {testKeyA}})
	if err := h.ServeHTTP(p.w, p.r, &nextRecorder{}); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte(testKeyA))
	rec := h.inline[digest]
	held := usageOf(rec).limit.Load()
	if held == nil {
		t.Fatal("the request kept no limit state on the key's usage record")
	}
	if st := h.limiter.state(&digest, h.defaultLimit); held != st {
		t.Error("the held state is not the limiter's state for the key")
	}
	if held.tat.Load() == 0 {
		t.Error("the held state counted nothing")
	}
	if held.holder.Load() != &usageOf(rec).limit {
		t.Error("the state does not know its holder, so a sweep could not let go of it")
	}
}

// TestLimiterConcurrentSweeps decides one key's requests from many
// goroutines, some through a held state and some by the map, while sweeps
// run and the clock moves in steps that let some sweeps drop the state:
// in every step exactly the burst is admitted.
func TestLimiterConcurrentSweeps(t *testing.T) {
	l, clock := newClockedLimiter()
	lim := ratelimit.Limit{Count: 50, Period: time.Hour, Burst: 50}
	k := sha256.Sum256([]byte("k"))
	var held atomic.Pointer[limitState]
	for step := range 20 {
		// Each step starts with the burst back: the state is idle.
		clock.advance(2 * time.Hour)
		var admitted atomic.Int64
		var wg sync.WaitGroup
		start := make(chan struct{})
		for g := range 8 {
			wg.Go(func() {
				<-start
				for i := range 40 {
					p := &held
					if (g+i)%2 == 0 {
						p = nil
					}
					if l.decide(p, &k, lim, 0).Allowed {
						admitted.Add(1)
					}
				}
			})
		}
		wg.Go(func() {
			<-start
			for range 20 {
				l.sweep()
			}
		})
		close(start)
		wg.Wait()
		if got := admitted.Load(); got != 50 {
			t.Fatalf("step %d: admitted %d, want 50", step, got)
		}
	}
}

func TestRemoveKey(t *testing.T) {
	tests := []struct {
		name      string
		from      []KeySource
		passKey   bool
		target    string
		header    http.Header
		wantQuery string
		wantHdr   http.Header
	}{
		{
			name:    "bearer",
			target:  "/",
			header:  http.Header{"Authorization": {"Bearer " + testKeyA}, "X-Other": {"1"}},
			wantHdr: http.Header{"X-Other": {"1"}},
		},
		{
			name:    "header",
			target:  "/",
			header:  http.Header{"X-Api-Key": {testKeyA}},
			wantHdr: http.Header{},
		},
		{
			name:      "query keeps other parameters",
			from:      []KeySource{{Source: "query", Name: "api_key"}},
			target:    "/p?a=1&api_key=" + testKeyA + "&b=2",
			wantQuery: "a=1&b=2",
			wantHdr:   http.Header{},
		},
		{
			name:    "cookie keeps other cookies",
			from:    []KeySource{{Source: "cookie", Name: "k"}},
			target:  "/",
			header:  http.Header{"Cookie": {"a=1; k=" + testKeyA + "; b=2"}},
			wantHdr: http.Header{"Cookie": {"a=1; b=2"}},
		},
		{
			name:    "cookie alone",
			from:    []KeySource{{Source: "cookie", Name: "k"}},
			target:  "/",
			header:  http.Header{"Cookie": {"k=" + testKeyA}},
			wantHdr: http.Header{},
		},
		{
			name:      "pass_key keeps it",
			from:      []KeySource{{Source: "query", Name: "api_key"}, {Source: "header", Name: "X-API-Key"}},
			passKey:   true,
			target:    "/?api_key=" + testKeyA,
			header:    http.Header{"X-Api-Key": {testKeyA}},
			wantQuery: "api_key=" + testKeyA,
			wantHdr:   http.Header{"X-Api-Key": {testKeyA}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestHandler(t, &Handler{From: tt.from, PassKey: tt.passKey, Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}})
			var next nextRecorder
			p := prepare(tt.target, tt.header)
			if err := h.ServeHTTP(p.w, p.r, &next); err != nil {
				t.Fatalf("ServeHTTP: %v", err)
			}
			got := next.last
			if got.URL.RawQuery != tt.wantQuery {
				t.Errorf("query = %q, want %q", got.URL.RawQuery, tt.wantQuery)
			}
			if tt.wantQuery != "" && !strings.HasSuffix(got.RequestURI, "?"+tt.wantQuery) {
				t.Errorf("RequestURI = %q, want it to end in ?%s", got.RequestURI, tt.wantQuery)
			}
			if fmt.Sprint(got.Header) != fmt.Sprint(tt.wantHdr) {
				t.Errorf("headers = %v, want %v", got.Header, tt.wantHdr)
			}
		})
	}
}

// TestCacheGeneration checks that a cached lookup from an older key set is
// never used: a removed key is rejected as soon as the new set is in place,
// even while the cache still holds it.
func TestCacheGeneration(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/keys.json"
	writeKeys := func(ids ...string) {
		t.Helper()
		var b strings.Builder
		b.WriteString(`{"keys": [`)
		for i, id := range ids {
			if i > 0 {
				b.WriteString(",")
			}
			fmt.Fprintf(&b, `{"id": %q, "hash": %q}`, id, hashOf("key-"+id))
		}
		b.WriteString("]}")
		if err := writeFileAtomic(path, []byte(b.String())); err != nil {
			t.Fatal(err)
		}
	}
	writeKeys("a", "b")
	h := newTestHandler(t, &Handler{KeysFile: path})
	find := func(key string) *keyRecord {
		d := sha256.Sum256([]byte(key))
		rec, err := h.find(httptest.NewRequest("GET", "/", nil), &d, new(monoNow()))
		if err != nil {
			t.Fatalf("find: %v", err)
		}
		return rec
	}
	for range 3 {
		if rec := find("key-a"); rec == nil || rec.id != "a" {
			t.Fatalf("key a not found: %v", rec)
		}
		if rec := find("key-c"); rec != nil {
			t.Fatalf("key c found before it exists")
		}
		h.cache.c.Wait()
	}
	d := sha256.Sum256([]byte("key-a"))
	if _, ok := h.cache.get(&d, h.keysFile.set.Load().gen, monoNow()); !ok {
		t.Fatal("key a is not cached; the test would prove nothing")
	}
	writeKeys("b", "c")
	if err := h.keysFile.check(); err != nil {
		t.Fatalf("reload: %v", err)
	}
	if rec := find("key-a"); rec != nil {
		t.Errorf("removed key a still found (id %s)", rec.id)
	}
	if rec := find("key-c"); rec == nil || rec.id != "c" {
		t.Errorf("added key c not found after reload: %v", rec)
	}
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// TestProvisionCleanupPools provisions and cleans up many handlers, as
// config reloads do, and checks that the shared state is released: no
// pool entries and no watcher goroutines are left behind.
func TestProvisionCleanupPools(t *testing.T) {
	path := t.TempDir() + "/keys.json"
	if err := os.WriteFile(path, []byte(`{"keys": [{"id": "a", "hash": "`+hashOf("k")+`"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	before := runtime.NumGoroutine()
	for range 200 {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		// A small cache: closing a large one is slow under -race.
		h := &Handler{KeysFile: path, Rate: "1/s", Cache: &CacheConfig{Size: 100}}
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		if err := h.Cleanup(); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	// A Provision that fails half way cleans up too.
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	bad := &Handler{KeysFile: path + ".missing"}
	if err := bad.Provision(ctx); err == nil {
		t.Fatal("Provision with a missing keys file succeeded")
	}
	if err := bad.Cleanup(); err != nil {
		t.Fatal(err)
	}
	cancel()
	for _, pool := range []*caddy.UsagePool{limiterPool, keysFilePool} {
		pool.Range(func(key, _ any) bool {
			t.Errorf("pool entry %v left after cleanup", key)
			return true
		})
	}
	// Goroutines of closed caches and stopped watchers may take a moment.
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before+2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if after := runtime.NumGoroutine(); after > before+2 {
		t.Errorf("goroutines grew from %d to %d", before, after)
	}
}

// TestCleanupWhileServing cleans a handler up while requests still run
// through it, as a config reload does: no panic, and the requests that
// come after the cleanup are still answered from the key set.
func TestCleanupWhileServing(t *testing.T) {
	for round := range 10 {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		h := &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: "1000000/1s", MaxFailures: "off"}
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		var next nextRecorder
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for g := range 4 {
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					key := testKeyA
					if i%2 == 1 {
						key = fmt.Sprint("unknown-", g, "-", i)
					}
					p := prepare("/", http.Header{"X-Api-Key": {key}})
					err := h.ServeHTTP(p.w, p.r, &next)
					if (err == nil) != (key == testKeyA) {
						t.Errorf("round %d: key %d: err = %v", round, i%2, err)
						return
					}
				}
			})
		}
		time.Sleep(5 * time.Millisecond)
		if err := h.Cleanup(); err != nil {
			t.Fatal(err)
		}
		cancel()
		time.Sleep(3 * cacheCloseDelay / 2) // ristretto is closed by now
		close(stop)
		wg.Wait()
	}
}

func TestProvisionDropsPlaintextKeys(t *testing.T) {
	const keyC = "third_key_0123456789"
	t.Setenv("APIKEY_TEST_KEY", testKeyB)
	// A placeholder may hold a hash, in any case, as {$VAR} may.
	t.Setenv("APIKEY_TEST_HASH", strings.ToUpper(hashOf(keyC)))
	h := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}, {ID: "b", Key: "{env.APIKEY_TEST_KEY}"}, {ID: "c", Key: "{env.APIKEY_TEST_HASH}"}}})
	for i, want := range []string{hashOf(testKeyA), hashOf(testKeyB), hashOf(keyC)} {
		if got := h.Keys[i].Key; got != want {
			t.Errorf("Keys[%d].Key = %q after Provision, want its digest %q", i, got, want)
		}
	}
	// The key of the hash works; the hash itself is no key.
	for _, tc := range []struct {
		key    string
		status int
	}{{keyC, 0}, {hashOf(keyC), http.StatusUnauthorized}, {strings.ToUpper(hashOf(keyC)), http.StatusUnauthorized}} {
		p := prepare("/", http.Header{"X-Api-Key": {tc.key}})
		err := h.ServeHTTP(p.w, p.r, &nextRecorder{})
		var he caddyhttp.HandlerError
		if tc.status == 0 && err != nil || tc.status != 0 && (!errorsAs(err, &he) || he.StatusCode != tc.status) {
			t.Errorf("key %.12s…: err = %v, want status %d (0: admitted)", tc.key, err, tc.status)
		}
	}
}

// TestProvisionErrors covers the checks of a JSON config, which does not go
// through the Caddyfile parser: each is an error that says what is wrong,
// from Provision or from Validate, and none quotes a key.
func TestProvisionErrors(t *testing.T) {
	t.Setenv("APIKEY_EMPTY", "")
	t.Setenv("APIKEY_BAD_HASH", "SHA256:SECRETnothex")
	many := make([]KeySource, 65)
	for i := range many {
		many[i] = KeySource{Source: "header", Name: fmt.Sprint("X-Key-", i)}
	}
	tests := []struct {
		name string
		h    Handler
		want string
	}{
		{"no keys", Handler{}, "no keys: set keys_file or key"},
		{"duplicate inline id", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}, {ID: "a", Key: testKeyB}}}, `keys[1] (id "a"): duplicate id`},
		{"same key twice", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}, {ID: "b", Key: hashOf(testKeyA)}}}, `keys[1] (id "b"): same key as id "a"`},
		{"bad inline id", Handler{Keys: []InlineKey{{ID: "a b", Key: testKeyA}}}, `keys[0]: "id" "a b": use visible ASCII`},
		{"bad inline digest", Handler{Keys: []InlineKey{{ID: "a", Key: "sha256:abc"}}}, `keys[0] (id "a"): "hash" must be "sha256:" and 64 hex digits, not 3 characters`},
		{"empty placeholder key", Handler{Keys: []InlineKey{{ID: "a", Key: "{env.APIKEY_EMPTY}"}}}, `keys[0] (id "a"): key {env.APIKEY_EMPTY} is empty (is the variable set?)`},
		{"bad digest in a placeholder", Handler{Keys: []InlineKey{{ID: "a", Key: "{env.APIKEY_BAD_HASH}"}}}, `keys[0] (id "a"): "hash" must be "sha256:" and 64 hex digits, not 12 characters`},
		{"key with a space", Handler{Keys: []InlineKey{{ID: "a", Key: "two words"}}}, `keys[0] (id "a"): key must be 1 to 512 visible ASCII characters`},
		{"burst without rate", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, Burst: 5}, "burst needs a rate"},
		{"bad rate", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, Rate: "ten/1m"}, `rate "ten/1m": count must be`},
		{"bad realm", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, Realm: `a"b`}, `realm "a\"b": use printable ASCII`},
		{"unknown source", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, From: []KeySource{{Source: "body"}}}, `unknown key source "body"`},
		{"header source without name", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, From: []KeySource{{Source: "header"}}}, `from header: invalid header name ""`},
		{"bearer with a name", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, From: []KeySource{{Source: "bearer", Name: "x"}}}, `from bearer takes no name`},
		{"cookie as a header", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, From: []KeySource{{Source: "header", Name: "cookie"}}}, "use from cookie <name>"},
		{"too many sources", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, From: many}, "from: at most 64 sources"},
		{"cache too large", Handler{Keys: []InlineKey{{ID: "a", Key: testKeyA}}, Cache: &CacheConfig{Size: maxCacheSize + 1}}, "cache: size must be from 1 to 16777216"},
		{"keys_file expands to nothing", Handler{KeysFile: "{env.APIKEY_EMPTY}"}, `keys_file "{env.APIKEY_EMPTY}" expands to an empty path`},
		{"keys_file missing", Handler{KeysFile: "/nonexistent/keys.json"}, "loading keys file /nonexistent/keys.json: stat /nonexistent/keys.json: no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			h := tt.h
			err := h.Provision(ctx)
			if err == nil {
				err = h.Validate()
			}
			if cerr := h.Cleanup(); cerr != nil {
				t.Errorf("Cleanup: %v", cerr)
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error = %v, want it to contain %q", err, tt.want)
			}
			for _, k := range []string{testKeyA, testKeyB, "two words"} {
				if strings.Contains(err.Error(), k) {
					t.Errorf("error %q quotes a key", err)
				}
			}
		})
	}
}

// TestLimiterSweeper checks that the sweeper goroutine drops idle state by
// itself and stops on Destruct.
func TestLimiterSweeper(t *testing.T) {
	l, clock := newClockedLimiter()
	l.startSweeper(5 * time.Millisecond)
	lim := ratelimit.Limit{Count: 1, Period: time.Second, Burst: 1}
	d := sha256.Sum256([]byte("k"))
	l.decide(nil, &d, lim, 0)
	time.Sleep(30 * time.Millisecond)
	if got := l.len(); got != 1 {
		t.Fatalf("a busy state was swept: %d states", got)
	}
	clock.advance(time.Second)
	deadline := time.Now().Add(5 * time.Second)
	for l.len() != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := l.len(); got != 0 {
		t.Fatalf("the sweeper left %d idle states", got)
	}
	if err := l.Destruct(); err != nil {
		t.Fatal(err)
	}
}

// The key leaves the request whatever the outcome, so that handle_errors
// cannot show it; with pass_key it stays.
func TestKeyRemovedOnRejection(t *testing.T) {
	keys := filepath.Join(t.TempDir(), "keys.json")
	if err := os.WriteFile(keys, []byte(`{"keys": [
		{"id": "off", "hash": "`+hashOf(testKeyA)+`", "disabled": true},
		{"id": "get", "hash": "`+hashOf(testKeyB)+`", "allow_methods": ["GET"]}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, pass := range []bool{false, true} {
		h := newTestHandler(t, &Handler{KeysFile: keys, PassKey: pass})
		for _, tc := range []struct {
			name   string
			method string
			key    string
			status int
		}{
			{"unknown", "GET", "nobody", 401},
			{"disabled", "GET", testKeyA, 401},
			{"forbidden", "POST", testKeyB, 403},
		} {
			t.Run(fmt.Sprintf("%s pass_key=%v", tc.name, pass), func(t *testing.T) {
				p := prepare("/", http.Header{"X-Api-Key": {tc.key}})
				p.r.Method = tc.method
				var he caddyhttp.HandlerError
				if err := h.ServeHTTP(p.w, p.r, &nextRecorder{}); !errorsAs(err, &he) || he.StatusCode != tc.status {
					t.Fatalf("err = %v, want %d", err, tc.status)
				}
				if got, want := p.r.Header.Get("X-Api-Key") != "", pass; got != want {
					t.Errorf("key still in the request: %v, want %v", got, want)
				}
			})
		}
	}
}

// A request refused as malformed (two different keys, or a value that
// cannot be a key) loses every value of every source that carried one,
// the good keys among them: handle_errors must not show them either.
func TestKeysRemovedFromMalformedRequest(t *testing.T) {
	long := strings.Repeat("k", maxKeyLen+1)
	for _, tc := range []struct {
		name   string
		target string
		header http.Header
	}{
		{"header and bearer differ", "/", http.Header{"X-Api-Key": {testKeyA}, "Authorization": {"Bearer " + testKeyB}}},
		{"header twice, differing", "/", http.Header{"X-Api-Key": {testKeyA, testKeyB}}},
		{"bearer too long beside a header key", "/", http.Header{"X-Api-Key": {testKeyA}, "Authorization": {"Bearer " + long}}},
		{"malformed header first, bearer key after", "/", http.Header{"X-Api-Key": {"bad\x01"}, "Authorization": {"Bearer " + testKeyA}}},
		{"cookie key, header not ASCII", "/", http.Header{"Cookie": {"s=1; k=" + testKeyA}, "X-Api-Key": {testKeyA + "\u00e9"}}},
		{"query badly escaped, header key", "/?api_key=%zz&a=b", http.Header{"X-Api-Key": {testKeyA}}},
		{"query key twice, differing, and a cookie key", "/?api_key=" + testKeyA + "&api_key=" + testKeyB, http.Header{"Cookie": {"k=" + testKeyA}}},
	} {
		for _, pass := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s pass_key=%v", tc.name, pass), func(t *testing.T) {
				h := newTestHandler(t, &Handler{From: fuzzSources, PassKey: pass, Keys: []InlineKey{{ID: "alpha", Key: testKeyA}, {ID: "bravo", Key: testKeyB}}})
				p := prepare(tc.target, tc.header.Clone())
				next := &nextRecorder{}
				var he caddyhttp.HandlerError
				if err := h.ServeHTTP(p.w, p.r, next); !errorsAs(err, &he) || he.StatusCode != http.StatusUnauthorized {
					t.Fatalf("err = %v, want 401", err)
				}
				if next.calls.Load() != 0 {
					t.Fatal("next was called")
				}
				if got := logFieldOf(t, p)["outcome"]; got != outcomeInvalid {
					t.Errorf("outcome = %v, want %s", got, outcomeInvalid)
				}
				sent := fmt.Sprint(tc.header) + tc.target
				left := fmt.Sprint(p.r.Header) + p.r.URL.RawQuery + p.r.RequestURI
				for _, key := range []string{testKeyA, testKeyB, long, "%zz", "bad"} {
					// With pass_key everything sent stays.
					want := pass && strings.Contains(sent, key)
					if got := strings.Contains(left, key); got != want {
						t.Errorf("%.12s… left in the request: %v, want %v (headers %q, URI %q)", key, got, want, p.r.Header, p.r.RequestURI)
					}
				}
				if !pass {
					if c := p.r.Header.Get("Cookie"); strings.Contains(tc.header.Get("Cookie"), "s=1") && c != "s=1" {
						t.Errorf("Cookie = %q, want the other cookie kept", c)
					}
					if q := p.r.URL.RawQuery; strings.Contains(tc.target, "a=b") && q != "a=b" {
						t.Errorf("query = %q, want the other parameter kept", q)
					}
				}
			})
		}
	}
}

// TestCacheExpiry checks that entries expire by the time the request read:
// a found key after ttl, an unknown one after negative_ttl, to the
// nanosecond.
func TestCacheExpiry(t *testing.T) {
	kc, err := newKeyCache(100, time.Minute, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer kc.close()
	found, unknown := sha256.Sum256([]byte("found")), sha256.Sum256([]byte("unknown"))
	rec := newKeyRecord(&keyRecord{id: "found"})
	const t0 = int64(time.Hour)
	kc.put(&found, 1, rec, t0)
	kc.put(&unknown, 1, nil, t0)
	kc.c.Wait()
	for _, tc := range []struct {
		name   string
		digest *[32]byte
		at     time.Duration
		hit    bool
	}{
		{"found, just before ttl", &found, time.Minute - 1, true},
		{"found, at ttl", &found, time.Minute, false},
		{"unknown, just before negative_ttl", &unknown, time.Second - 1, true},
		{"unknown, at negative_ttl", &unknown, time.Second, false},
	} {
		got, ok := kc.get(tc.digest, 1, t0+int64(tc.at))
		if ok != tc.hit {
			t.Errorf("%s: hit = %v, want %v", tc.name, ok, tc.hit)
		}
		if ok && (got == nil) != (tc.digest == &unknown) {
			t.Errorf("%s: record = %v", tc.name, got)
		}
	}
}

func TestCachePurge(t *testing.T) {
	kc, err := newKeyCache(100, time.Hour, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	defer kc.close()
	d := sha256.Sum256([]byte("k"))
	rec := newKeyRecord(&keyRecord{id: "k"})
	kc.put(&d, 7, rec, 1)
	kc.c.Wait()
	if got, ok := kc.get(&d, 7, 1); !ok || got != rec {
		t.Fatal("entry not cached")
	}
	kc.purge()
	if _, ok := kc.get(&d, 7, 1); ok {
		t.Fatal("entry still found after purge")
	}
	kc.put(&d, 7, rec, 1)
	kc.c.Wait()
	if got, ok := kc.get(&d, 7, 1); !ok || got != rec {
		t.Fatal("entry put after purge not found")
	}
}

// TestHotPathAllocs counts the allocations of an admitted request with a
// cached key, as BenchmarkServeHTTP prepares it: one, for the rate headers
// and the log field together with a limit, and for the log field alone
// without. Issue 2 allows at most 3.
func TestHotPathAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's sync.Pool drops items at random: counts are not exact")
	}
	for _, tc := range []struct {
		name string
		rate string
		hdr  http.Header
		want float64
	}{
		{"bearer/rate", "1000000000/1s", http.Header{"Authorization": {"Bearer " + testKeyA}}, 1},
		{"header/rate", "1000000000/1s", http.Header{"X-Api-Key": {testKeyA}}, 1},
		{"header/norate", "", http.Header{"X-Api-Key": {testKeyA}}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: tc.rate})
			br := benchRequests(1, func(int) http.Header { return tc.hdr })[0]
			serve := func() {
				br.reset()
				if err := h.ServeHTTP(br.w, br.r, nopNext); err != nil {
					t.Fatal(err)
				}
			}
			serve() // the first request fills the cache
			h.cache.c.Wait()
			if got := testing.AllocsPerRun(1000, serve); got > tc.want {
				t.Errorf("allocations per request = %v, want at most %v", got, tc.want)
			}
			if id, _ := br.repl.GetString("http.api_key.id"); id != "alpha" {
				t.Errorf("http.api_key.id = %q after the last request", id)
			}
		})
	}
}

// TestValidKeyAgrees checks the eight-bytes-at-a-time validKey against the
// byte-by-byte rule: every byte value at every position of a word, and
// random strings of every length around the word size.
func TestValidKeyAgrees(t *testing.T) {
	slow := func(v string) bool {
		if len(v) == 0 || len(v) > maxKeyLen {
			return false
		}
		for i := 0; i < len(v); i++ {
			if v[i] <= ' ' || v[i] >= 0x7f {
				return false
			}
		}
		return true
	}
	base := []byte("abcdefghijklmnopqrstuvwxyz012345") // 32 visible bytes
	for pos := range 17 {
		for b := range 256 {
			v := bytes.Clone(base[:17])
			v[pos] = byte(b)
			if got, want := validKey(string(v)), slow(string(v)); got != want {
				t.Fatalf("byte %#02x at %d: validKey = %v, want %v", b, pos, got, want)
			}
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200000 {
		v := make([]byte, rng.IntN(40))
		for i := range v {
			// Mostly visible bytes, so that whole strings pass often.
			if rng.IntN(20) == 0 {
				v[i] = byte(rng.IntN(256))
			} else {
				v[i] = byte(0x21 + rng.IntN(0x7e-0x21+1))
			}
		}
		if got, want := validKey(string(v)), slow(string(v)); got != want {
			t.Fatalf("%q: validKey = %v, want %v", v, got, want)
		}
	}
	for _, n := range []int{maxKeyLen, maxKeyLen + 1} {
		if got, want := validKey(strings.Repeat("k", n)), n <= maxKeyLen; got != want {
			t.Errorf("%d bytes: validKey = %v, want %v", n, got, want)
		}
	}
}

// TestUnknownKeysNotCachedInMemoryStores checks that with the keys in
// memory (inline keys, a keys file) an unknown key takes no cache entry,
// while a found one does. (With store redis an unknown key is cached:
// TestRedisStore's "addition seen once published".)
func TestUnknownKeysNotCachedInMemoryStores(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "keys.json")
	if err := os.WriteFile(file, []byte(`{"keys": [{"id": "file", "hash": "`+hashOf(testKeyB)+`"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		h     *Handler
		found string
	}{
		{"inline", &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}}, testKeyA},
		{"keys file", &Handler{KeysFile: file}, testKeyB},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newTestHandler(t, tc.h)
			hits, misses := since(apiKeyMetrics.cacheHits), since(apiKeyMetrics.cacheMisses)
			for _, k := range []string{"unknown-key", "unknown-key", tc.found} {
				p := prepare("/", http.Header{"X-Api-Key": {k}})
				_ = h.ServeHTTP(p.w, p.r, &nextRecorder{})
				h.cache.c.Wait()
			}
			p := prepare("/", http.Header{"X-Api-Key": {tc.found}})
			if err := h.ServeHTTP(p.w, p.r, &nextRecorder{}); err != nil {
				t.Fatalf("found key refused: %v", err)
			}
			if hits() != 1 || misses() != 3 {
				t.Errorf("cache hits %v, misses %v; want 1 (the found key, again), 3", hits(), misses())
			}
			var gen uint64
			if h.keysFile != nil {
				gen = h.keysFile.set.Load().gen
			}
			unknown := sha256.Sum256([]byte("unknown-key"))
			if _, ok := h.cache.get(&unknown, gen, monoNow()); ok {
				t.Error("the unknown key is cached")
			}
		})
	}
}

// TestRefusedWithoutErrorRoutes checks both ways a refusal ends: on a
// server without error routes the handler writes the status itself, with
// no body, and returns nil; on one with handle_errors, and with refusals
// errors on any server, it returns the error and writes nothing. The
// headers, outcome and log field are the same every way, and the request
// is never handed on.
func TestRefusedWithoutErrorRoutes(t *testing.T) {
	keys := []InlineKey{{ID: "alpha", Key: testKeyA}}
	autoH := newTestHandler(t, &Handler{Keys: keys, Rate: "1/1m", MaxFailures: "off"})
	errorsH := newTestHandler(t, &Handler{Keys: keys, Rate: "1/1m", MaxFailures: "off", Refusals: "errors"})
	// alpha's one request is spent (both handlers share the limiter), so
	// that its next is over the limit.
	if p := prepare("/", http.Header{"X-Api-Key": {testKeyA}}); autoH.ServeHTTP(p.w, p.r, &nextRecorder{}) != nil || p.w.status != 0 {
		t.Fatal("alpha's first request refused")
	}
	noRoutes := &caddyhttp.Server{}
	for _, tc := range []struct {
		name    string
		hdr     http.Header
		status  int
		outcome string
	}{
		{"missing", nil, http.StatusUnauthorized, outcomeMissing},
		{"invalid", http.Header{"X-Api-Key": {"nope"}}, http.StatusUnauthorized, outcomeInvalid},
		{"malformed", http.Header{"X-Api-Key": {"bad\x01"}}, http.StatusUnauthorized, outcomeInvalid},
		{"rate limited", http.Header{"X-Api-Key": {testKeyA}}, http.StatusTooManyRequests, outcomeRateLimited},
	} {
		var written http.Header // the headers of the written refusal
		for _, mode := range []struct {
			name    string
			h       *Handler
			srv     *caddyhttp.Server
			written bool
		}{
			{"auto, no error routes", autoH, noRoutes, true},
			{"auto, error routes", autoH, testServer, false},
			{"errors, no error routes", errorsH, noRoutes, false},
		} {
			t.Run(tc.name+"/"+mode.name, func(t *testing.T) {
				p := prepareOn(mode.srv, "/", tc.hdr)
				w := &bodyWriter{testWriter: p.w}
				next := &nextRecorder{}
				err := mode.h.ServeHTTP(w, p.r, next)
				if mode.written {
					if err != nil {
						t.Fatalf("err = %v, want nil (the status written)", err)
					}
					if p.w.status != tc.status || w.body.Len() != 0 {
						t.Errorf("written: status %d, body %q; want %d, no body", p.w.status, w.body.String(), tc.status)
					}
					written = p.w.hdr.Clone()
				} else {
					var he caddyhttp.HandlerError
					if !errorsAs(err, &he) || he.StatusCode != tc.status {
						t.Fatalf("err = %v, want a HandlerError %d", err, tc.status)
					}
					if p.w.status != 0 || w.body.Len() != 0 {
						t.Errorf("status %d and %d bytes written; handle_errors should write them", p.w.status, w.body.Len())
					}
					if !reflect.DeepEqual(p.w.hdr, written) {
						t.Errorf("headers %v, want those of the written refusal %v", p.w.hdr, written)
					}
				}
				want := "Www-Authenticate"
				if tc.status == http.StatusTooManyRequests {
					want = "Retry-After"
				}
				if p.w.hdr.Get(want) == "" {
					t.Errorf("no %s header", want)
				}
				if next.calls.Load() != 0 {
					t.Error("the request was handed on")
				}
				if got := logFieldOf(t, p)["outcome"]; got != tc.outcome {
					t.Errorf("log field outcome %v, want %s", got, tc.outcome)
				}
				if got := p.repl.ReplaceAll("{http.api_key.outcome}", ""); got != tc.outcome {
					t.Errorf("{http.api_key.outcome} = %q, want %s", got, tc.outcome)
				}
			})
		}
	}
}

// bodyWriter is a testWriter that keeps what is written.
type bodyWriter struct {
	*testWriter
	body bytes.Buffer
}

func (w *bodyWriter) Write(b []byte) (int, error) { return w.body.Write(b) }
