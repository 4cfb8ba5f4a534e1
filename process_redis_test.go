package apikey_test

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	apikey "github.com/keystile/caddy-apikey"
)

// procRedisSite is a site whose keys and counters are in the Redis at
// addr, with more api_key settings in extra.
func procRedisSite(addr, extra string) string {
	return fmt.Sprintf("log {\n\toutput file %s\n\tformat json\n}\napi_key {\n\tredis {\n\t\taddress %s\n\t}\n\tstore redis\n\tlimits redis\n%s}\nrespond \"ok\"",
		e2eAccessLogToken, addr, extra)
}

// procGenerateRedis makes a key with the CLI, in Redis, and returns it
// and its keys-file record.
func procGenerateRedis(t *testing.T, e *procEnv, addr, id string) (key, record string) {
	t.Helper()
	stdout, _ := e.apiKey(t, "generate", "--redis", addr, "--id", id, "--prefix", "sk")
	lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "sk_") {
		t.Fatalf("generate --redis printed %q, want a sk_ key and a record", stdout)
	}
	return lines[0], lines[1]
}

// Two servers that share one Redis enforce one combined limit, and a key
// disabled through the CLI is refused by both within a second.
func TestProcessRedisTwoServers(t *testing.T) {
	r := apikey.StartTestRedis(t)
	site := procRedisSite(r.Addr, "\trate 20/1m\n")
	e1, e2 := procSetup(t, site), procSetup(t, site)
	key, _ := procGenerateRedis(t, e1, r.Addr, "shared")
	c1, c2 := e1.run(t), e2.run(t)

	t.Run("one combined limit", func(t *testing.T) {
		admitted, limited := 0, 0
		for i := range 40 {
			c := c1
			if i%2 == 1 {
				c = c2
			}
			switch resp := c.get(t, fmt.Sprintf("/limit/%d", i), bearer(key)); resp.status {
			case http.StatusOK:
				admitted++
			case http.StatusTooManyRequests:
				limited++
				if resp.header.Get("Retry-After") == "" {
					t.Errorf("429 without Retry-After")
				}
			default:
				t.Fatalf("request %d: status %d %q", i, resp.status, resp.body)
			}
		}
		if admitted != 20 || limited != 20 {
			t.Errorf("40 requests alternating between two servers: %d admitted, %d limited; want 20 and 20", admitted, limited)
		}
	})

	t.Run("disabled through the CLI", func(t *testing.T) {
		other, _ := procGenerateRedis(t, e1, r.Addr, "other")
		for _, c := range []*procCaddy{c1, c2} {
			if resp := c.get(t, "/before", bearer(other)); resp.status != http.StatusOK {
				t.Fatalf("before disable: %d, want 200", resp.status)
			}
		}
		e1.apiKey(t, "disable", "--redis", r.Addr, "--id", "other")
		disabledAt := time.Now()
		for n, c := range []*procCaddy{c1, c2} {
			for i := 0; ; i++ {
				resp := c.get(t, fmt.Sprintf("/after/%d", i), bearer(other))
				if resp.status == http.StatusUnauthorized {
					break
				}
				if time.Since(disabledAt) > time.Second {
					t.Fatalf("server %d still answers %d a second after the key was disabled", n+1, resp.status)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		e2eWaitLog(t, e2.accessLog, "a refused request with the disabled key", func(a e2eAccessEntry) bool {
			return strings.HasPrefix(a.Request.URI, "/after/") && a.APIKey["outcome"] == "disabled" && a.APIKey["id"] == "other"
		})
	})
}

// Stopping Redis mid-run gives each server its configured behaviour, with
// no 5xx, and both recover when Redis is back.
func TestProcessRedisOutage(t *testing.T) {
	r := apikey.StartTestRedis(t)
	deny := procSetup(t, procRedisSite(r.Addr, "\trate 100000/1m\n"))
	cached := procSetup(t, procRedisSite(r.Addr, "\trate 100000/1m\n\ton_store_error allow_cached\n\ton_limiter_error local\n"))
	key, record := procGenerateRedis(t, deny, r.Addr, "k1")
	cDeny, cCached := deny.run(t), cached.run(t)
	for _, c := range []*procCaddy{cDeny, cCached} {
		if resp := c.get(t, "/warm", bearer(key)); resp.status != http.StatusOK {
			t.Fatalf("before the outage: %d, want 200", resp.status)
		}
	}

	// Requests keep flowing to both servers through the outage; none may
	// get a 5xx.
	var fivexx, total atomic.Int64
	var samples sync.Map
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, c := range []*procCaddy{cDeny, cCached} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := e2eClient(t)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				status, body, err := procGetStatus(client, fmt.Sprintf("%s/flow?i=%d", c.env.base, i), key)
				total.Add(1)
				if err != nil || status >= 500 {
					fivexx.Add(1)
					samples.Store(fmt.Sprintf("%s: %d %q %v", c.env.base, status, body, err), true)
				}
			}
		}()
	}
	defer func() {
		close(stop)
		wg.Wait()
		if n := fivexx.Load(); n != 0 {
			var list []string
			samples.Range(func(k, _ any) bool { list = append(list, k.(string)); return len(list) < 5 })
			t.Errorf("%d of %d requests through the outage failed or got a 5xx: %s", n, total.Load(), strings.Join(list, "; "))
		}
	}()

	r.Stop()
	respDeny := procAwait(t, cDeny, "/down", bearer(key), http.StatusUnauthorized)
	if got := respDeny.header.Get("Retry-After"); got != "1" {
		t.Errorf("on_store_error deny: Retry-After = %q, want 1", got)
	}
	e2eWaitLog(t, deny.accessLog, "store_unavailable in the log", func(a e2eAccessEntry) bool {
		return strings.HasPrefix(a.Request.URI, "/down?") && a.APIKey["outcome"] == "store_unavailable"
	})
	respCached := cCached.get(t, "/down-cached", bearer(key))
	if respCached.status != http.StatusOK {
		t.Errorf("on_store_error allow_cached: cached key got %d, want 200", respCached.status)
	}
	entry := e2eWaitLog(t, cached.accessLog, "the degraded request", func(a e2eAccessEntry) bool {
		return a.Request.URI == "/down-cached"
	})
	if entry.APIKey["outcome"] != "ok" || entry.APIKey["degraded"] == "" {
		t.Errorf("log api_key while Redis is down = %v, want outcome ok and a degraded value", entry.APIKey)
	}

	// Redis comes back empty (it keeps nothing on disk here): put the key
	// back, as an operator restoring it would.
	r.Start()
	keys := filepath.Join(t.TempDir(), "keys.json")
	if err := os.WriteFile(keys, []byte(`{"keys": [`+record+`]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	deny.apiKey(t, "import", "--redis", r.Addr, keys)
	for _, c := range []*procCaddy{cDeny, cCached} {
		procAwait(t, c, "/back", bearer(key), http.StatusOK)
	}
	// The allow_cached server answered 200 throughout; once its watcher
	// sees Redis again (a ping a second), requests are no longer
	// degraded.
	deadline := time.Now().Add(6 * time.Second)
	for i := 0; ; i++ {
		uri := fmt.Sprintf("/recovered/%d", i)
		cCached.get(t, uri, bearer(key))
		entry := e2eWaitLog(t, cached.accessLog, "request "+uri, func(a e2eAccessEntry) bool { return a.Request.URI == uri })
		if _, degraded := entry.APIKey["degraded"]; !degraded && entry.APIKey["outcome"] == "ok" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("log api_key 6 s after Redis came back = %v, want no degraded", entry.APIKey)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
