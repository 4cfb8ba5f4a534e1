package apikey

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// poolLen counts the entries of a usage pool.
func poolLen(p *caddy.UsagePool) int {
	n := 0
	p.Range(func(any, any) bool { n++; return true })
	return n
}

// TestProvisionCleanupNoLeak provisions and cleans up a handler with every
// local part (keys file and its watcher, limiter, quota store, cache,
// brute-force guard's sweeper) 1000 times, as config reloads do: no
// goroutine and no usage-pool entry may be left over.
func TestProvisionCleanupNoLeak(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys.json")
	if err := os.WriteFile(keys, []byte(`{"keys": [{"id": "a", "hash": "`+hashOf(testKeyA)+`", "plan": "p"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	pools := map[string]*caddy.UsagePool{"limiter": limiterPool, "keys file": keysFilePool, "quota": quotaPool, "redis": redisPool}
	before := map[string]int{}
	for name, p := range pools {
		before[name] = poolLen(p)
	}
	goroutines := runtime.NumGoroutine()

	for i := range 1000 {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		h := &Handler{KeysFile: keys, Rate: "10/1s", Quota: "1000000/day", QuotaFile: filepath.Join(dir, "q.db"),
			Plans: map[string]*Plan{"p": {Rate: "1000000/1s"}}, Metrics: &MetricsConfig{PerKey: true}}
		if err := h.Provision(ctx); err != nil {
			t.Fatalf("round %d: Provision: %v", i, err)
		}
		p := prepare("/", map[string][]string{"X-Api-Key": {testKeyA}})
		if err := h.ServeHTTP(p.w, p.r, &nextRecorder{}); err != nil {
			t.Fatalf("round %d: ServeHTTP: %v", i, err)
		}
		if err := h.Cleanup(); err != nil {
			t.Fatalf("round %d: Cleanup: %v", i, err)
		}
		cancel()
	}

	for name, p := range pools {
		if n := poolLen(p); n != before[name] {
			t.Errorf("%s pool: %d entries after 1000 reloads, %d before", name, n, before[name])
		}
	}
	// Goroutines that end on a cancelled context or a closed cache may
	// take a moment; wait for them, with a deadline.
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > goroutines+5 {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after 1000 reloads, %d before", runtime.NumGoroutine(), goroutines)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := len(liveHandlers()); n != 0 {
		t.Errorf("%d handlers still listed for the admin API", n)
	}
}
