package apikey

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
)

// poolLen counts the entries of a usage pool.
func poolLen(p *caddy.UsagePool) int {
	n := 0
	p.Range(func(any, any) bool { n++; return true })
	return n
}

// leakCacheSize is the lookup cache's size in the leak tests. The
// default (100,000) has ristretto allocate and clear megabytes of
// counters in every round, which made a round cost ~60 ms under -race;
// its goroutines are the same whatever its size.
const leakCacheSize = 1000

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
	pools := map[string]*caddy.UsagePool{"limiter": limiterPool, "keys file": keysFilePool, "quota": quotaPool, "redis": redisPool, "cache": cachePool}
	before := map[string]int{}
	for name, p := range pools {
		before[name] = poolLen(p)
	}
	goroutines := runtime.NumGoroutine()

	for i := range 1000 {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		h := &Handler{KeysFile: keys, Rate: "10/1s", Quota: "1000000/day", QuotaFile: filepath.Join(dir, "q.db"),
			Plans: map[string]*Plan{"p": {Rate: "1000000/1s"}}, Metrics: &MetricsConfig{PerKey: true},
			Cache: &CacheConfig{Size: leakCacheSize}}
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

// TestProvisionCleanupNoLeakRedis does the same with keys and counters in
// a real Redis (store redis, limits redis): the backend's change-channel
// listener and health watcher, its connections to Redis and its
// usage-pool entry must all go when the last handler that uses it is
// cleaned up, and must not pile up while config reloads hand it on.
func TestProvisionCleanupNoLeakRedis(t *testing.T) {
	r := StartTestRedis(t)
	c := rdClient(t, r)
	key := rdKey(t, "k")
	rdPut(t, c, key, keyFileEntry{ID: "leak"})
	pools := map[string]*caddy.UsagePool{"limiter": limiterPool, "keys file": keysFilePool, "quota": quotaPool, "redis": redisPool, "cache": cachePool}
	dir := t.TempDir()
	// newHandler provisions a handler as a config load does. The timeout
	// is generous: a command that timed out on a busy machine would make
	// the request degraded, which is not what this test is about.
	type config struct {
		*Handler
		cancel context.CancelFunc
	}
	newHandler := func(t *testing.T, round int) config {
		t.Helper()
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		h := &Handler{Store: "redis", Limits: "redis", Rate: "1000000/1s", Quota: "100000000/day",
			OnStoreError: storeErrorAllowCached, OnLimiterError: limiterErrorLocal,
			Redis:     &RedisConfig{Addresses: []string{r.Addr}, Timeout: caddy.Duration(5 * time.Second)},
			QuotaFile: filepath.Join(dir, "q.db"), Metrics: &MetricsConfig{PerKey: true},
			Cache: &CacheConfig{Size: leakCacheSize}}
		if err := h.Provision(ctx); err != nil {
			cancel()
			t.Fatalf("round %d: Provision: %v", round, err)
		}
		return config{h, cancel}
	}
	cleanup := func(t *testing.T, h config, round int) {
		t.Helper()
		if err := h.Cleanup(); err != nil {
			t.Fatalf("round %d: Cleanup: %v", round, err)
		}
		h.cancel()
	}
	serve := func(t *testing.T, h *Handler, round int) {
		t.Helper()
		rdCheck(t, fmt.Sprintf("round %d", round), rdServe(h, key), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "leak"})
	}

	// 1000 rounds of each take about 15 and 8 s under -race on a
	// shared 2-core machine.
	const rounds = 1000
	tests := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"a backend of its own each round", func(t *testing.T) {
			// The only handler on this Redis: each Provision makes a
			// backend and each Cleanup destroys it. The round waits
			// until the listener has subscribed, so that there is a
			// change-channel connection to close.
			for i := range rounds {
				h := newHandler(t, i)
				for deadline := time.Now().Add(5 * time.Second); !h.redis.subscribed.Load(); time.Sleep(time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatalf("round %d: the backend has not subscribed within 5 s", i)
					}
				}
				serve(t, h.Handler, i)
				cleanup(t, h, i)
			}
		}},
		{"handed on from config to config", func(t *testing.T) {
			// As caddy reload does: the new config is provisioned
			// before the old one is cleaned up, so the backend, its
			// connections and its goroutines carry over.
			prev := newHandler(t, -1)
			backend := prev.redis
			maxConns := 0
			for i := range rounds {
				h := newHandler(t, i)
				if h.redis != backend {
					t.Fatalf("round %d: a new Redis backend while the old config still held one", i)
				}
				serve(t, h.Handler, i)
				cleanup(t, prev, i)
				prev = h
				if i%100 == 99 {
					maxConns = max(maxConns, redisConns(t, c))
				}
			}
			// One connection for commands, one for the change channel,
			// the watcher's ping, and this test's own.
			if maxConns > 5 {
				t.Errorf("%d Redis connections during the reloads, want at most 5", maxConns)
			}
			cleanup(t, prev, rounds)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := map[string]int{}
			for name, p := range pools {
				before[name] = poolLen(p)
			}
			goroutines := runtime.NumGoroutine()
			conns := redisConns(t, c)

			tt.run(t)

			for name, p := range pools {
				if n := poolLen(p); n != before[name] {
					t.Errorf("%s pool: %d entries after %d reloads, %d before", name, n, rounds, before[name])
				}
			}
			// Redis notices closed connections, and goroutines end, a
			// moment later; wait for both, with a deadline.
			deadline := time.Now().Add(10 * time.Second)
			for {
				n, g := redisConns(t, c), runtime.NumGoroutine()
				if n <= conns && g <= goroutines+5 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("after %d reloads: %d Redis connections (%d before), %d goroutines (%d before)", rounds, n, conns, g, goroutines)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if n := len(liveHandlers()); n != 0 {
				t.Errorf("%d handlers still listed for the admin API", n)
			}
		})
	}
}

// redisConns counts the clients connected to Redis (CLIENT LIST),
// including c's own.
func redisConns(t *testing.T, c *redis.Client) int {
	t.Helper()
	list, err := c.ClientList(context.Background()).Result()
	if err != nil {
		t.Fatalf("CLIENT LIST: %v", err)
	}
	return strings.Count(list, "\n")
}
