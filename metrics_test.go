package apikey

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// since returns a function that tells how much c has grown since now.
// The metrics are process-wide, so tests compare growth, not values.
func since(c prometheus.Collector) func() float64 {
	start := testutil.ToFloat64(c)
	return func() float64 { return testutil.ToFloat64(c) - start }
}

// The metrics are registered in the registry of each config load, once
// whatever the number of handlers.
func TestMetricsRegistered(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	for range 2 { // two handlers of one config
		h := &Handler{Keys: []InlineKey{{ID: "a", Key: hashOf(testKeyA)}}}
		if err := h.Provision(ctx); err != nil {
			t.Fatalf("Provision: %v", err)
		}
		t.Cleanup(func() { _ = h.Cleanup() })
	}
	families, err := ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range families {
		names = append(names, f.GetName())
	}
	for _, want := range []string{"caddy_api_key_requests_total", "caddy_api_key_cache_hits_total", "caddy_api_key_cache_misses_total"} {
		if !slices.Contains(names, want) {
			t.Errorf("registry lacks %s; it has %v", want, names)
		}
	}
}

func TestMetricsCount(t *testing.T) {
	h := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "a", Key: hashOf(testKeyA)}}, Rate: "2/1m"})
	m := &apiKeyMetrics
	ok, missing, invalid, limited := since(m.byOutcome[outcomeOK]), since(m.byOutcome[outcomeMissing]),
		since(m.byOutcome[outcomeInvalid]), since(m.byOutcome[outcomeRateLimited])
	hits, misses := since(m.cacheHits), since(m.cacheMisses)
	rateAllowed, rateDenied := since(m.decided[limitRate][resultAllowed][countersLocal]), since(m.decided[limitRate][resultDenied][countersLocal])

	for _, hdr := range []http.Header{
		{"X-Api-Key": {testKeyA}}, {"X-Api-Key": {testKeyA}}, {"X-Api-Key": {testKeyA}}, // ok, ok, 429
		nil,                        // missing
		{"X-Api-Key": {"nope"}},    // invalid (a miss)
		{"X-Api-Key": {"nope"}},    // invalid (a miss again: keys in memory)
		{"X-Api-Key": {"bad\x01"}}, // invalid, no lookup
	} {
		p := prepare("/", hdr)
		_ = h.ServeHTTP(p.w, p.r, &nextRecorder{})
	}
	h.cache.c.Wait()
	for _, c := range []struct {
		name      string
		got, want float64
	}{
		{"ok", ok(), 2}, {"missing", missing(), 1}, {"invalid", invalid(), 3}, {"rate_limited", limited(), 1},
		{"rate allowed", rateAllowed(), 2}, {"rate denied", rateDenied(), 1},
		{"cache lookups", hits() + misses(), 5},
	} {
		if c.got != c.want {
			t.Errorf("%s: counted %v, want %v", c.name, c.got, c.want)
		}
	}
	if misses() < 2 {
		t.Errorf("cache misses %v, want at least 2 (the first lookup of each key)", misses())
	}
}

// Per-key series are capped: ids past the cap are counted as "other".
func TestMetricsPerKeyCap(t *testing.T) {
	keys := []InlineKey{{ID: "pk-1", Key: hashOf("per-key-1")}, {ID: "pk-2", Key: hashOf("per-key-2")}, {ID: "pk-3", Key: hashOf("per-key-3")}}
	// The cap is per process: ids seen by other tests count too.
	seen := apiKeyMetrics.perKeyIDs.Load()
	h := newTestHandler(t, &Handler{Keys: keys, Metrics: &MetricsConfig{PerKey: true, MaxKeys: int(seen) + 2}})
	kr := apiKeyMetrics.keyRequests
	one, two, other := since(kr.WithLabelValues("pk-1", "ok")), since(kr.WithLabelValues("pk-2", "ok")), since(kr.WithLabelValues(otherKeyID, "ok"))
	three := since(kr.WithLabelValues("pk-3", "ok"))
	for _, k := range []string{"per-key-1", "per-key-2", "per-key-3", "per-key-3", "per-key-1"} {
		p := prepare("/", http.Header{"X-Api-Key": {k}})
		if err := h.ServeHTTP(p.w, p.r, &nextRecorder{}); err != nil {
			t.Fatal(err)
		}
	}
	if one() != 2 || two() != 1 || other() != 2 || three() != 0 {
		t.Errorf("per key: pk-1 %v, pk-2 %v, other %v, pk-3 %v; want 2, 1, 2, 0", one(), two(), other(), three())
	}

	// The same key under another id, on another site: its requests are
	// not counted in the series the key's usage keeps for pk-1, and pk-1's
	// still are afterwards.
	h2 := newTestHandler(t, &Handler{Keys: []InlineKey{{ID: "pk-1b", Key: hashOf("per-key-1")}}, Metrics: &MetricsConfig{PerKey: true, MaxKeys: int(seen) + 2}})
	send := func(h *Handler) {
		p := prepare("/", http.Header{"X-Api-Key": {"per-key-1"}})
		if err := h.ServeHTTP(p.w, p.r, &nextRecorder{}); err != nil {
			t.Fatal(err)
		}
	}
	send(h2)
	send(h2)
	send(h)
	if one() != 3 || other() != 4 {
		t.Errorf("after the same key as pk-1b: pk-1 %v, other %v; want 3, 4", one(), other())
	}

	// A key counted as "other" keeps no series: under a handler with room
	// for its id, it gets its own.
	h3 := newTestHandler(t, &Handler{Keys: keys, Metrics: &MetricsConfig{PerKey: true, MaxKeys: int(seen) + 3}})
	p := prepare("/", http.Header{"X-Api-Key": {"per-key-3"}})
	if err := h3.ServeHTTP(p.w, p.r, &nextRecorder{}); err != nil {
		t.Fatal(err)
	}
	if three() != 1 || other() != 4 {
		t.Errorf("pk-3 under a higher cap: pk-3 %v, other %v; want 1, 4", three(), other())
	}
}

func TestMetricsCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want *MetricsConfig
		err  string
	}{
		{"metrics per_key", &MetricsConfig{PerKey: true}, ""},
		{"metrics per_key max_keys 50", &MetricsConfig{PerKey: true, MaxKeys: 50}, ""},
		{"metrics", nil, "metrics: want metrics per_key [max_keys <n>]"},
		{"metrics per_key max_keys 0", nil, `metrics: max_keys "0"`},
		{"metrics per_key max_keys 5 x", nil, `metrics: unexpected argument "x"`},
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
			if err != nil || *h.Metrics != *tc.want {
				t.Fatalf("Metrics = %+v, %v; want %+v", h.Metrics, err, tc.want)
			}
		})
	}
}
