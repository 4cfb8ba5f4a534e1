package apikey

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// The tests in this file run against a real redis-server (StartTestRedis),
// each against its own. They write keys as the CLI does: HSET of
// <prefix>key:<hex digest> with the fields of entryHash, then PUBLISH of
// the hex digest on <prefix>events.

// rdKey is a key of the test's own. The local limiter and the quota store
// are shared by every handler in the process, so no two tests may share a
// key.
func rdKey(t testing.TB, name string) string {
	return "redis_test_key/" + t.Name() + "/" + name
}

func rdHex(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

// rdClient is a go-redis client of the test's own, as the CLI would use.
func rdClient(t testing.TB, r *TestRedis) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// rdPut writes the record of key into Redis under the default prefix, as
// the CLI does. It does not publish.
func rdPut(t testing.TB, c *redis.Client, key string, e keyFileEntry) {
	t.Helper()
	e.Hash = hashOf(key)
	fields, err := entryHash(e)
	if err != nil {
		t.Fatalf("entryHash: %v", err)
	}
	if err := c.HSet(context.Background(), defaultRedisPrefix+"key:"+rdHex(key), fields).Err(); err != nil {
		t.Fatalf("HSET: %v", err)
	}
}

// rdPublish announces a change of key, as the CLI does, and checks that
// some backend heard it.
func rdPublish(t testing.TB, c *redis.Client, key string) {
	t.Helper()
	n, err := c.Publish(context.Background(), defaultRedisPrefix+"events", rdHex(key)).Result()
	if err != nil {
		t.Fatalf("PUBLISH: %v", err)
	}
	if n == 0 {
		t.Fatal("PUBLISH reached no subscriber: the backend does not listen")
	}
}

// rdHandler provisions h with Redis at r (unless h.Redis is set) and a
// quota file of its own, and waits until its backend listens on the
// change channel: a (re)subscription changes the cache generation, which
// would make a cached lookup a miss in the middle of a test.
func rdHandler(t testing.TB, r *TestRedis, h *Handler) *Handler {
	t.Helper()
	if h.Redis == nil {
		h.Redis = &RedisConfig{Addresses: []string{r.Addr}}
	}
	if h.QuotaFile == "" {
		h.QuotaFile = filepath.Join(t.TempDir(), "quotas.db")
	}
	newTestHandler(t, h)
	rdWaitSubscribed(t, h)
	return h
}

// rdWaitSubscribed waits until h's backend has subscribed to the change
// channel and read the generation.
func rdWaitSubscribed(t testing.TB, h *Handler) {
	t.Helper()
	rdWait(t, 5*time.Second, "the backend subscribes to the change channel", func() string {
		if h.redis.subscribed.Load() && h.redis.gen.Load() > redisGenBase {
			return ""
		}
		return "not subscribed yet"
	})
}

// rdWaitDown waits until h's backend has marked Redis down.
func rdWaitDown(t testing.TB, h *Handler) {
	t.Helper()
	rdWait(t, 5*time.Second, "the watcher marks Redis down", func() string {
		if h.redis.down.Load() {
			return ""
		}
		return "not marked down yet"
	})
}

// rdWait polls cond every 20 ms until it answers "", and fails the test
// if it has not within the deadline. cond answers what is still wrong.
func rdWait(t testing.TB, within time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		last := cond()
		if last == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last: %s", what, within, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// rdFastWatch makes backends created from now on check Redis's health
// every 20 ms, so that recovery is noticed quickly.
func rdFastWatch(t testing.TB) {
	old := redisWatchInterval
	redisWatchInterval = 20 * time.Millisecond
	// Registered before any handler's cleanup, so it runs after them:
	// their watchers have stopped by then.
	t.Cleanup(func() { redisWatchInterval = old })
}

// rdObserve sends the logs of h and of its backend to an observer.
func rdObserve(h *Handler) *observer.ObservedLogs {
	core, logs := observer.New(zapcore.DebugLevel)
	l := zap.New(core)
	h.logger = l
	h.redis.logger.Store(l)
	return logs
}

// rdServe sends a request with key as a Bearer token (none when empty)
// through h. It is safe to call from several goroutines: a ServeHTTP
// error that is not a caddyhttp.HandlerError is status -1, and a panic
// is a 500, as Caddy's server answers one.
func rdServe(h *Handler, key string) (res polResult) {
	hdr := http.Header{}
	if key != "" {
		hdr.Set("Authorization", "Bearer "+key)
	}
	p := prepare("/", hdr)
	next := new(nextRecorder)
	res = polResult{p: p, next: next, status: http.StatusOK}
	defer func() {
		if v := recover(); v != nil {
			res.status, res.err = http.StatusInternalServerError, fmt.Errorf("ServeHTTP panicked: %v", v)
		}
	}()
	err := h.ServeHTTP(p.w, p.r, next)
	res.err = err
	if err != nil {
		var he caddyhttp.HandlerError
		if errors.As(err, &he) {
			res.status = he.StatusCode
		} else {
			res.status = -1
		}
	}
	return res
}

// rdLogField is the api_key log field of a request, as logFieldOf reads
// it, without a *testing.T (for polling and goroutines).
func rdLogField(p prepared) map[string]any {
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

// rdWant is what the answer to a request must be.
type rdWant struct {
	status   int // 200: handed on to the next handler
	outcome  string
	id       string // the key id in the log field; "" for none
	degraded string // the log field's degraded; "" for none
	retry    string // Retry-After; "" for none, "+" for any whole number of seconds ≥ 1
}

// rdMismatch says how res differs from w: the status (never a 5xx),
// whether next ran, the whole api_key log field, the outcome placeholder,
// the challenge and Retry-After. It answers "" when nothing differs.
func rdMismatch(res polResult, w rdWant) string {
	var bad []string
	if res.status < 0 || res.status >= 500 {
		return fmt.Sprintf("status %d (err %v): the module must never answer with a server error", res.status, res.err)
	}
	if res.status != w.status {
		bad = append(bad, fmt.Sprintf("status = %d (err %v), want %d", res.status, res.err, w.status))
	}
	wantCalls := int64(0)
	if w.status == http.StatusOK {
		wantCalls = 1
	}
	if got := res.next.calls.Load(); got != wantCalls {
		bad = append(bad, fmt.Sprintf("next called %d times, want %d", got, wantCalls))
	}
	want := map[string]any{"outcome": w.outcome}
	if w.id != "" {
		want["id"] = w.id
	}
	if w.degraded != "" {
		want["degraded"] = w.degraded
	}
	if got := rdLogField(res.p); !reflect.DeepEqual(got, want) {
		bad = append(bad, fmt.Sprintf("log field api_key = %v, want %v", got, want))
	}
	if got := res.p.repl.ReplaceAll("{http.api_key.outcome}", ""); got != w.outcome {
		bad = append(bad, fmt.Sprintf("{http.api_key.outcome} = %q, want %q", got, w.outcome))
	}
	wantChallenge := ""
	if w.status == http.StatusUnauthorized {
		wantChallenge = polBadChallenge
		if w.outcome == outcomeStoreUnavailable {
			// The key may well be good: no invalid_token.
			wantChallenge = `Bearer realm="api"`
		}
	}
	if got := res.p.w.hdr.Get("WWW-Authenticate"); got != wantChallenge {
		bad = append(bad, fmt.Sprintf("WWW-Authenticate = %q, want %q", got, wantChallenge))
	}
	retry := res.p.w.hdr.Values("Retry-After")
	switch {
	case w.retry == "+":
		if n, err := strconv.ParseInt(strings.Join(retry, ","), 10, 64); err != nil || n < 1 {
			bad = append(bad, fmt.Sprintf("Retry-After = %q, want whole seconds ≥ 1", retry))
		}
	case w.retry == "" && len(retry) != 0, w.retry != "" && strings.Join(retry, ",") != w.retry:
		bad = append(bad, fmt.Sprintf("Retry-After = %q, want %q", retry, w.retry))
	}
	return strings.Join(bad, "; ")
}

func rdCheck(t *testing.T, what string, res polResult, w rdWant) {
	t.Helper()
	if m := rdMismatch(res, w); m != "" {
		t.Fatalf("%s: %s", what, m)
	}
}

// rdTimed serves a request while Redis is away: it must come back long
// before anything could have waited on Redis for more than its timeout
// (50 ms); 2 s leaves room for a slow machine and the race detector.
func rdTimed(t *testing.T, h *Handler, key string) polResult {
	t.Helper()
	start := time.Now()
	res := rdServe(h, key)
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("request took %v with Redis away, and a timeout of %v", d, h.redis.timeout)
	}
	return res
}

func rdLogCount(logs *observer.ObservedLogs, snippet string) int {
	return logs.FilterMessageSnippet(snippet).Len()
}

const (
	rdLogDown = "redis unavailable"
	rdLogUp   = "redis available again"
)

// TestRedisCleanupQuietChannel checks that Cleanup of the last handler
// that uses a Redis backend returns while Redis is up and nothing is
// published on the change channel, as on a config reload or shutdown of
// a quiet deployment.
func TestRedisCleanupQuietChannel(t *testing.T) {
	r := StartTestRedis(t)
	h := &Handler{Store: "redis", Redis: &RedisConfig{Addresses: []string{r.Addr}}, QuotaFile: filepath.Join(t.TempDir(), "quotas.db")}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	rdWait(t, 5*time.Second, "the backend subscribes to the change channel", func() string {
		if h.redis.subscribed.Load() {
			return ""
		}
		return "not subscribed yet"
	})
	done := make(chan error, 1)
	go func() { done <- h.Cleanup() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Cleanup: %v", err)
		}
		return
	case <-time.After(5 * time.Second):
	}
	t.Fatal("Cleanup (redisBackend.Destruct) still waiting after 5 s on a quiet change channel")
}

// TestRedisEntryHashRoundTrip checks that a keys-file entry with every
// field set goes into a Redis hash (entryHash) and comes back unchanged
// (entryFromHash), directly and through Redis, and that the backend's
// lookup makes the same record of it as a keys file does.
func TestRedisEntryHashRoundTrip(t *testing.T) {
	key := rdKey(t, "full")
	burst := int64(7)
	full := keyFileEntry{
		ID:        "acme-prod",
		Hash:      hashOf(key),
		Name:      "Acme production",
		Owner:     "ops@acme.example",
		Plan:      "gold",
		Rate:      "100/1m",
		Burst:     &burst,
		Quota:     "10000/month",
		NotBefore: "2024-01-01T00:00:00Z",
		Expires:   "2031-01-01T00:00:00Z",
		Disabled:  true,
		Metadata:  map[string]string{"tier": "gold", "region": "eu-west"},
		Restrictions: Restrictions{
			AllowIPs:       []string{"192.0.2.0/24", "2001:db8::1"},
			AllowReferrers: []string{"https://*.acme.example/*"},
			AllowMethods:   []string{"GET", "POST"},
			AllowPaths:     []string{"/v1", "/v2/*/items"},
		},
	}
	// Every field is set, so that a field added to keyFileEntry fails
	// here until the hash carries it.
	rdAllSet(t, reflect.ValueOf(full), "keyFileEntry")

	fields, err := entryHash(full)
	if err != nil {
		t.Fatalf("entryHash: %v", err)
	}
	got := make(map[string]string, len(fields))
	for name, v := range fields {
		s, ok := v.(string)
		if !ok {
			t.Errorf("field %s is a %T, want a string", name, v)
		}
		got[name] = s
	}
	want := map[string]string{
		"id":              "acme-prod",
		"name":            "Acme production",
		"owner":           "ops@acme.example",
		"plan":            "gold",
		"rate":            "100/1m",
		"burst":           "7",
		"quota":           "10000/month",
		"not_before":      "2024-01-01T00:00:00Z",
		"expires":         "2031-01-01T00:00:00Z",
		"disabled":        "true",
		"metadata":        `{"region":"eu-west","tier":"gold"}`,
		"allow_ips":       `["192.0.2.0/24","2001:db8::1"]`,
		"allow_referrers": `["https://*.acme.example/*"]`,
		"allow_methods":   `["GET","POST"]`,
		"allow_paths":     `["/v1","/v2/*/items"]`,
	}
	// No "hash": the digest is the Redis key's name.
	if !reflect.DeepEqual(got, want) {
		t.Errorf("entryHash =\n%v\nwant\n%v", got, want)
	}
	back, err := entryFromHash(rdHex(key), got)
	if err != nil {
		t.Fatalf("entryFromHash: %v", err)
	}
	if !reflect.DeepEqual(back, full) {
		t.Errorf("entryFromHash(entryHash(e)) =\n%+v\nwant\n%+v", back, full)
	}

	minimal := keyFileEntry{ID: "minimal", Hash: hashOf(rdKey(t, "minimal"))}
	fields, err = entryHash(minimal)
	if err != nil {
		t.Fatalf("entryHash: %v", err)
	}
	if !reflect.DeepEqual(fields, map[string]any{"id": "minimal"}) {
		t.Errorf("entryHash(minimal) = %v, want only the id", fields)
	}
	if back, err := entryFromHash(rdHex(rdKey(t, "minimal")), map[string]string{"id": "minimal"}); err != nil || !reflect.DeepEqual(back, minimal) {
		t.Errorf("entryFromHash(minimal) = %+v, %v; want %+v", back, err, minimal)
	}

	// Through Redis, and into a record as the handler makes one.
	r := StartTestRedis(t)
	c := rdClient(t, r)
	rdPut(t, c, key, full)
	stored, err := c.HGetAll(context.Background(), defaultRedisPrefix+"key:"+rdHex(key)).Result()
	if err != nil {
		t.Fatalf("HGETALL: %v", err)
	}
	if !reflect.DeepEqual(stored, want) {
		t.Errorf("hash in Redis =\n%v\nwant\n%v", stored, want)
	}
	if back, err := entryFromHash(rdHex(key), stored); err != nil || !reflect.DeepEqual(back, full) {
		t.Errorf("entryFromHash(HGETALL) = %+v, %v; want %+v", back, err, full)
	}
	h := rdHandler(t, r, &Handler{Store: "redis", Plans: map[string]*Plan{"gold": {}}})
	digest := sha256.Sum256([]byte(key))
	rec, err := h.redis.lookup(context.Background(), &digest)
	if err != nil || rec == nil {
		t.Fatalf("lookup = %v, %v; want the record", rec, err)
	}
	wantRec, err := full.record()
	if err != nil {
		t.Fatalf("record: %v", err)
	}
	rec.provider, wantRec.provider = nil, nil // funcs never compare equal
	if !reflect.DeepEqual(rec, wantRec) {
		t.Errorf("record from Redis =\n%+v\nwant, as from a keys file,\n%+v", rec, wantRec)
	}
	// The disabled key is known, with its id and plan, and refused.
	res := rdServe(h, key)
	if res.status != http.StatusUnauthorized || rdLogField(res.p)["outcome"] != outcomeDisabled || rdLogField(res.p)["plan"] != "gold" {
		t.Errorf("request with the disabled key: status %d, log field %v; want 401, disabled, plan gold", res.status, rdLogField(res.p))
	}
	if rec, err := h.redis.lookup(context.Background(), new([32]byte)); rec != nil || err != nil {
		t.Errorf("lookup of a key not in Redis = %v, %v; want nil, nil", rec, err)
	}
}

// rdAllSet fails the test for every field of the struct v that is zero,
// looking into embedded structs.
func rdAllSet(t *testing.T, v reflect.Value, path string) {
	t.Helper()
	for i := range v.NumField() {
		f, sf := v.Field(i), v.Type().Field(i)
		if sf.Anonymous && f.Kind() == reflect.Struct {
			rdAllSet(t, f, path+"."+sf.Name)
			continue
		}
		if f.IsZero() {
			t.Errorf("%s.%s is not set: the round trip must cover every field", path, sf.Name)
		}
	}
}

// TestRedisBadRecord checks that a hash in Redis that does not check out
// (a field keys files do not have, a value of the wrong type, a value a
// keys file would refuse) is a badRecordError from lookup, and that the
// handler treats the key as unknown (401 invalid), logs it once without
// the key, and does not take Redis for down.
func TestRedisBadRecord(t *testing.T) {
	r := StartTestRedis(t)
	c := rdClient(t, r)
	h := rdHandler(t, r, &Handler{Store: "redis", Plans: map[string]*Plan{"gold": {}}})
	logs := rdObserve(h)

	tests := []struct {
		name    string
		hash    map[string]string
		lookup  bool   // lookup itself refuses it (else only the handler: plan)
		logText string // in the log message
	}{
		{"unknown field", map[string]string{"id": "x", "colour": "red"}, true, "key in redis refused"},
		{"burst not a number", map[string]string{"id": "x", "burst": "seven"}, true, "key in redis refused"},
		{"disabled not a boolean", map[string]string{"id": "x", "disabled": "yes"}, true, "key in redis refused"},
		{"metadata not JSON", map[string]string{"id": "x", "metadata": "{"}, true, "key in redis refused"},
		{"allow_methods not a list", map[string]string{"id": "x", "allow_methods": `"GET"`}, true, "key in redis refused"},
		{"bad rate", map[string]string{"id": "x", "rate": "fast"}, true, "key in redis refused"},
		{"bad expires", map[string]string{"id": "x", "expires": "tomorrow"}, true, "key in redis refused"},
		{"bad allow_ips", map[string]string{"id": "x", "allow_ips": `["not-an-address"]`}, true, "key in redis refused"},
		{"no id", map[string]string{"name": "nameless"}, true, "key in redis refused"},
		{"unknown plan", map[string]string{"id": "x", "plan": "platinum"}, false, "unknown plan"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := rdKey(t, "bad")
			hexDigest := rdHex(key)
			args := make(map[string]any, len(tt.hash))
			for k, v := range tt.hash {
				args[k] = v
			}
			if err := c.HSet(context.Background(), defaultRedisPrefix+"key:"+hexDigest, args).Err(); err != nil {
				t.Fatalf("HSET: %v", err)
			}
			digest := sha256.Sum256([]byte(key))
			rec, err := h.redis.lookup(context.Background(), &digest)
			var bad badRecordError
			if tt.lookup {
				if rec != nil || !errors.As(err, &bad) {
					t.Fatalf("lookup = %v, %v; want a badRecordError", rec, err)
				}
				if strings.Contains(err.Error(), key) || strings.Contains(err.Error(), hexDigest) {
					t.Errorf("lookup error %q quotes the key or its whole digest", err)
				}
			} else if rec == nil || err != nil {
				t.Fatalf("lookup = %v, %v; want the record (its plan is the handler's business)", rec, err)
			}
			if h.redis.down.Load() {
				t.Fatal("a bad record marked Redis down")
			}

			before := rdLogCount(logs, tt.logText)
			rdCheck(t, "bad record", rdServe(h, key), rdWant{status: http.StatusUnauthorized, outcome: outcomeInvalid})
			if n := rdLogCount(logs, tt.logText) - before; n != 1 {
				t.Errorf("%d log entries %q, want 1", n, tt.logText)
			}
			for _, e := range logs.All() {
				if s := fmt.Sprint(e.Message, e.ContextMap()); strings.Contains(s, key) {
					t.Errorf("log entry %q quotes the key", s)
				}
			}
			if h.redis.down.Load() {
				t.Error("a bad record marked Redis down")
			}
			// Remembered as unknown: not looked up, nor logged, again.
			h.cache.c.Wait()
			rdCheck(t, "bad record again", rdServe(h, key), rdWant{status: http.StatusUnauthorized, outcome: outcomeInvalid})
			if n := rdLogCount(logs, tt.logText) - before; n != 1 {
				t.Errorf("%d log entries %q after a second request, want 1 (the second answer comes from the cache)", n, tt.logText)
			}
		})
	}
}

// TestRedisStore checks keys looked up in Redis: found and unknown keys,
// both cached (a change not published is not seen), and a published
// change (removal, addition, disabling) seen within 1 s.
func TestRedisStore(t *testing.T) {
	r := StartTestRedis(t)
	c := rdClient(t, r)
	alpha, bravo, late, unknown := rdKey(t, "alpha"), rdKey(t, "bravo"), rdKey(t, "late"), rdKey(t, "unknown")
	rdPut(t, c, alpha, keyFileEntry{ID: "alpha"})
	rdPut(t, c, bravo, keyFileEntry{ID: "bravo", Name: "Bravo"})
	h := rdHandler(t, r, &Handler{Store: "redis"})
	okAlpha := rdWant{status: http.StatusOK, outcome: outcomeOK, id: "alpha"}
	invalid := rdWant{status: http.StatusUnauthorized, outcome: outcomeInvalid}
	ctx := context.Background()

	t.Run("found and unknown", func(t *testing.T) {
		res := rdServe(h, bravo)
		rdCheck(t, "bravo", res, rdWant{status: http.StatusOK, outcome: outcomeOK, id: "bravo"})
		if got := res.p.repl.ReplaceAll("{http.api_key.name}", ""); got != "Bravo" {
			t.Errorf("{http.api_key.name} = %q, want Bravo", got)
		}
		rdCheck(t, "unknown", rdServe(h, unknown), invalid)
	})

	t.Run("removal seen once published", func(t *testing.T) {
		rdCheck(t, "first", rdServe(h, alpha), okAlpha)
		h.cache.c.Wait()
		if err := c.Del(ctx, defaultRedisPrefix+"key:"+rdHex(alpha)).Err(); err != nil {
			t.Fatalf("DEL: %v", err)
		}
		// Not published: the cache answers, not Redis.
		rdCheck(t, "after an unpublished DEL", rdServe(h, alpha), okAlpha)
		rdPublish(t, c, alpha)
		rdWait(t, time.Second, "a removed key refused once published", func() string {
			return rdMismatch(rdServe(h, alpha), invalid)
		})
	})

	t.Run("addition seen once published", func(t *testing.T) {
		rdCheck(t, "before it exists", rdServe(h, late), invalid)
		h.cache.c.Wait()
		rdPut(t, c, late, keyFileEntry{ID: "late"})
		rdCheck(t, "after an unpublished HSET", rdServe(h, late), invalid)
		rdPublish(t, c, late)
		rdWait(t, time.Second, "an added key admitted once published", func() string {
			return rdMismatch(rdServe(h, late), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "late"})
		})
	})

	t.Run("disabled seen once published", func(t *testing.T) {
		rdCheck(t, "before", rdServe(h, bravo), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "bravo"})
		h.cache.c.Wait()
		if err := c.HSet(ctx, defaultRedisPrefix+"key:"+rdHex(bravo), "disabled", "true").Err(); err != nil {
			t.Fatalf("HSET: %v", err)
		}
		rdPublish(t, c, bravo)
		rdWait(t, time.Second, "a disabled key refused once published", func() string {
			return rdMismatch(rdServe(h, bravo), rdWant{status: http.StatusUnauthorized, outcome: outcomeDisabled, id: "bravo"})
		})
	})
	if h.redis.down.Load() {
		t.Error("Redis marked down")
	}
}

// rdLimitsHandler is a handler with one inline key whose limits are
// counted in Redis at r, with its own backend per timeout.
func rdLimitsHandler(t *testing.T, r *TestRedis, key, rate, q string, timeout time.Duration) *Handler {
	t.Helper()
	return rdHandler(t, r, &Handler{
		Keys:   []InlineKey{{ID: "shared", Key: hashOf(key)}},
		Rate:   rate,
		Quota:  q,
		Limits: "redis",
		Redis:  &RedisConfig{Addresses: []string{r.Addr}, Timeout: caddy.Duration(timeout)},
	})
}

// TestRedisLimitsAcrossServers checks that handlers with separate Redis
// backends (two servers) admit together exactly what the rate allows,
// in turn and all at once.
func TestRedisLimitsAcrossServers(t *testing.T) {
	r := StartTestRedis(t)
	rateLimited := rdWant{status: http.StatusTooManyRequests, outcome: outcomeRateLimited, id: "shared", retry: "+"}

	t.Run("alternating", func(t *testing.T) {
		key := rdKey(t, "k")
		// Timeouts far above a round trip, so that no request falls back
		// to local counting on a busy machine.
		servers := []*Handler{
			rdLimitsHandler(t, r, key, "20/1m", "", 2*time.Second),
			rdLimitsHandler(t, r, key, "20/1m", "", 3*time.Second),
		}
		if servers[0].redis == servers[1].redis {
			t.Fatal("the two handlers share a backend; they must stand for two servers")
		}
		admitted := [2]int{}
		for i := range 40 {
			res := rdServe(servers[i%2], key)
			if i < 20 {
				rdCheck(t, fmt.Sprintf("request %d", i+1), res, rdWant{status: http.StatusOK, outcome: outcomeOK, id: "shared"})
				admitted[i%2]++
			} else {
				rdCheck(t, fmt.Sprintf("request %d", i+1), res, rateLimited)
				if got := res.p.w.hdr.Get("RateLimit"); !strings.HasPrefix(got, `"default";r=0;t=`) {
					t.Errorf("request %d: RateLimit = %q, want r=0", i+1, got)
				}
			}
		}
		if admitted != [2]int{10, 10} {
			t.Errorf("admitted per server = %v, want 10 each", admitted)
		}
	})

	t.Run("concurrent", func(t *testing.T) {
		key := rdKey(t, "k")
		servers := []*Handler{
			rdLimitsHandler(t, r, key, "10/1m", "", 2*time.Second),
			rdLimitsHandler(t, r, key, "10/1m", "", 3*time.Second),
		}
		results := make([]polResult, 100)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range results {
			wg.Go(func() {
				<-start
				results[i] = rdServe(servers[i%2], key)
			})
		}
		close(start)
		wg.Wait()
		admitted := 0
		for i, res := range results {
			if res.status == http.StatusOK {
				admitted++
				rdCheck(t, fmt.Sprintf("request %d", i), res, rdWant{status: http.StatusOK, outcome: outcomeOK, id: "shared"})
			} else {
				rdCheck(t, fmt.Sprintf("request %d", i), res, rateLimited)
			}
		}
		if admitted != 10 {
			t.Errorf("%d of 100 concurrent requests admitted, want exactly 10", admitted)
		}
	})
}

// TestRedisQuota checks a quota counted in Redis: the headers count down,
// the request after the last is refused until midnight UTC by every
// server, and refused requests (by the quota or the rate) count nothing.
func TestRedisQuota(t *testing.T) {
	r := StartTestRedis(t)
	c := rdClient(t, r)
	ctx := context.Background()
	// counter reads the quota counter of key in Redis.
	counter := func(t *testing.T, h *Handler, key string) string {
		t.Helper()
		start, _ := h.defaultQuota.Period.Bounds(time.Now())
		v, err := c.Get(ctx, h.redis.schema.quotaKey(rdHex(key), h.defaultQuota, start)).Result()
		if err != nil {
			t.Fatalf("GET quota counter: %v", err)
		}
		return v
	}

	t.Run("quota", func(t *testing.T) {
		midnight := polSecsToMidnight(t)
		key := rdKey(t, "k")
		h := rdLimitsHandler(t, r, key, "", "5/day", 2*time.Second)
		other := rdLimitsHandler(t, r, key, "", "5/day", 3*time.Second)
		for i := range 5 {
			res := rdServe(h, key)
			rdCheck(t, fmt.Sprintf("request %d", i+1), res, rdWant{status: http.StatusOK, outcome: outcomeOK, id: "shared"})
			polHeader(t, res.p.w.hdr, "RateLimit", `"quota";r=`+strconv.Itoa(4-i)+`;t={M}`, midnight)
			polHeader(t, res.p.w.hdr, "RateLimit-Policy", `"quota";q=5;w=86400`, midnight)
		}
		// The first refusal is Redis's, the next ones the pre-check's,
		// then another server's.
		for i, srv := range []*Handler{h, h, h, other} {
			res := rdServe(srv, key)
			rdCheck(t, fmt.Sprintf("refusal %d", i+1), res, rdWant{status: http.StatusTooManyRequests, outcome: outcomeQuotaExceeded, id: "shared", retry: "+"})
			polHeader(t, res.p.w.hdr, "Retry-After", "{M}", midnight)
			polHeader(t, res.p.w.hdr, "RateLimit", `"quota";r=0;t={M}`, midnight)
		}
		if got := counter(t, h, key); got != "5" {
			t.Errorf("quota counter = %s, want 5: refused requests count nothing", got)
		}
		// It outlives its day by one more, as the local store's count does.
		start, _ := h.defaultQuota.Period.Bounds(time.Now())
		ttl, err := c.TTL(ctx, h.redis.schema.quotaKey(rdHex(key), h.defaultQuota, start)).Result()
		if err != nil {
			t.Fatalf("TTL: %v", err)
		}
		if want := midnight + 86400; int64(ttl.Seconds()) < want-5 || int64(ttl.Seconds()) > want+5 {
			t.Errorf("quota counter TTL = %v, want %d s (±5): midnight UTC plus a day", ttl, want)
		}
	})

	t.Run("rate refusal spends no quota", func(t *testing.T) {
		midnight := polSecsToMidnight(t)
		key := rdKey(t, "k")
		h := rdLimitsHandler(t, r, key, "2/1m", "5/day", 2*time.Second)
		other := rdLimitsHandler(t, r, key, "2/1m", "5/day", 3*time.Second)
		for i := range 2 {
			res := rdServe(h, key)
			rdCheck(t, fmt.Sprintf("request %d", i+1), res, rdWant{status: http.StatusOK, outcome: outcomeOK, id: "shared"})
			polHeader(t, res.p.w.hdr, "RateLimit", `"default";r=`+strconv.Itoa(1-i)+`;t=`+strconv.Itoa(30*(i+1))+`, "quota";r=`+strconv.Itoa(4-i)+`;t={M}`, midnight)
		}
		// Both refusals are Redis's: the other server has no memory of
		// the first.
		for i, srv := range []*Handler{h, other} {
			res := rdServe(srv, key)
			rdCheck(t, fmt.Sprintf("refusal %d", i+1), res, rdWant{status: http.StatusTooManyRequests, outcome: outcomeRateLimited, id: "shared", retry: "+"})
			polHeader(t, res.p.w.hdr, "RateLimit", `"default";r=0;t=60, "quota";r=3;t={M}`, midnight)
		}
		if got := counter(t, h, key); got != "2" {
			t.Errorf("quota counter = %s, want 2: requests refused by the rate spend no quota", got)
		}
	})
}

var rdRValue = regexp.MustCompile(`;r=(\d+)`)
var rdTValue = regexp.MustCompile(`;t=(\d+)`)

// rdSameHeader reports how header values a (local) and b (Redis) differ:
// the same text, except that t= values and Retry-After may be 1 apart
// (they are measured a moment apart, on two clocks).
func rdSameHeader(name, a, b string) string {
	ta, tb := rdTValue.FindAllStringSubmatch(a, -1), rdTValue.FindAllStringSubmatch(b, -1)
	if rdTValue.ReplaceAllString(a, ";t=T") != rdTValue.ReplaceAllString(b, ";t=T") || len(ta) != len(tb) {
		return fmt.Sprintf("%s: local %q, redis %q", name, a, b)
	}
	for i := range ta {
		x, _ := strconv.Atoi(ta[i][1])
		y, _ := strconv.Atoi(tb[i][1])
		if x-y > 1 || y-x > 1 {
			return fmt.Sprintf("%s: local %q, redis %q", name, a, b)
		}
	}
	return ""
}

// TestRedisHeadersMatchLocal sends the same requests to a handler that
// counts locally and to one that counts in Redis: the same statuses,
// outcomes and RateLimit, RateLimit-Policy and Retry-After values.
func TestRedisHeadersMatchLocal(t *testing.T) {
	r := StartTestRedis(t)
	tests := []struct {
		name    string
		quota   string
		status  []int
		rValues []string // the r= values of RateLimit
	}{
		{"rate", "", []int{200, 200, 200, 429, 429, 429}, []string{"2", "1", "0", "0", "0", "0"}},
		// Requests 5 and 6 are answered by the pre-check, from Redis's
		// denial of request 4.
		{"rate and quota", "4/day", []int{200, 200, 200, 429, 429, 429}, []string{"2,3", "1,2", "0,1", "0,1", "0,1", "0,1"}},
		{"quota first", "2/day", []int{200, 200, 429, 429, 429}, []string{"2,1", "1,0", "0", "0", "0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.quota != "" {
				polSecsToMidnight(t)
			}
			lkey, rkey := rdKey(t, "local"), rdKey(t, "redis")
			local := newTestHandler(t, &Handler{
				Keys: []InlineKey{{ID: "shared", Key: hashOf(lkey)}},
				Rate: "3/1m", Burst: 3, Quota: tt.quota, QuotaFile: filepath.Join(t.TempDir(), "quotas.db"),
			})
			remote := rdHandler(t, r, &Handler{
				Keys: []InlineKey{{ID: "shared", Key: hashOf(rkey)}},
				Rate: "3/1m", Burst: 3, Quota: tt.quota, Limits: "redis",
				Redis: &RedisConfig{Addresses: []string{r.Addr}, Timeout: caddy.Duration(2 * time.Second)},
			})
			for i, wantStatus := range tt.status {
				a, b := rdServe(local, lkey), rdServe(remote, rkey)
				if a.status != wantStatus || b.status != wantStatus {
					t.Fatalf("request %d: status local %d, redis %d (err %v); want %d", i+1, a.status, b.status, b.err, wantStatus)
				}
				if oa, ob := rdLogField(a.p)["outcome"], rdLogField(b.p)["outcome"]; oa != ob {
					t.Errorf("request %d: outcome local %v, redis %v", i+1, oa, ob)
				}
				var rs []string
				for _, m := range rdRValue.FindAllStringSubmatch(b.p.w.hdr.Get("RateLimit"), -1) {
					rs = append(rs, m[1])
				}
				if got := strings.Join(rs, ","); got != tt.rValues[i] {
					t.Errorf("request %d: redis RateLimit = %q: r= %s, want %s", i+1, b.p.w.hdr.Get("RateLimit"), got, tt.rValues[i])
				}
				for _, name := range []string{"RateLimit", "RateLimit-Policy"} {
					if d := rdSameHeader(name, a.p.w.hdr.Get(name), b.p.w.hdr.Get(name)); d != "" {
						t.Errorf("request %d: %s", i+1, d)
					}
				}
				ra, rb := a.p.w.hdr.Get("Retry-After"), b.p.w.hdr.Get("Retry-After")
				if d := rdSameHeader("Retry-After", ";t="+ra, ";t="+rb); d != "" || (ra == "") != (wantStatus == 200) {
					t.Errorf("request %d: Retry-After local %q, redis %q", i+1, ra, rb)
				}
			}
		})
	}
}

// rdEvalCalls is how many scripts Redis has run (EVALSHA and EVAL) since
// its statistics were last reset.
func rdEvalCalls(t *testing.T, c *redis.Client) int64 {
	t.Helper()
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatalf("INFO commandstats: %v", err)
	}
	var n int64
	for _, line := range strings.Split(info, "\r\n") {
		name, stats, _ := strings.Cut(line, ":")
		if name != "cmdstat_evalsha" && name != "cmdstat_eval" {
			continue
		}
		for _, kv := range strings.Split(stats, ",") {
			if v, ok := strings.CutPrefix(kv, "calls="); ok {
				calls, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					t.Fatalf("INFO commandstats: %q", line)
				}
				n += calls
			}
		}
	}
	return n
}

// TestRedisPreCheck checks the local pre-check: once Redis has denied a
// key, the requests in its retry window are denied without a round trip
// (Redis runs no script for them, and they are denied even with Redis
// gone), and the key is admitted again once the window is past.
func TestRedisPreCheck(t *testing.T) {
	r := StartTestRedis(t)
	c := rdClient(t, r)
	over, other := rdKey(t, "over"), rdKey(t, "other")
	h := rdHandler(t, r, &Handler{
		Keys:   []InlineKey{{ID: "over", Key: hashOf(over)}, {ID: "other", Key: hashOf(other)}},
		Rate:   "2/1m",
		Limits: "redis",
		Redis:  &RedisConfig{Addresses: []string{r.Addr}, Timeout: caddy.Duration(2 * time.Second)},
	})
	ok := rdWant{status: http.StatusOK, outcome: outcomeOK, id: "over"}
	denied := rdWant{status: http.StatusTooManyRequests, outcome: outcomeRateLimited, id: "over", retry: "+"}
	rdCheck(t, "request 1", rdServe(h, over), ok)
	rdCheck(t, "request 2", rdServe(h, over), ok)
	rdCheck(t, "request 3, denied by Redis", rdServe(h, over), denied)

	if err := c.ConfigResetStat(context.Background()).Err(); err != nil {
		t.Fatalf("CONFIG RESETSTAT: %v", err)
	}
	for i := range 5 {
		res := rdServe(h, over)
		rdCheck(t, fmt.Sprintf("request %d in the retry window", i+4), res, denied)
		if got := res.p.w.hdr.Get("RateLimit"); !strings.HasPrefix(got, `"default";r=0;t=`) {
			t.Errorf("RateLimit = %q, want r=0", got)
		}
	}
	if n := rdEvalCalls(t, c); n != 0 {
		t.Errorf("Redis ran %d scripts for requests in the retry window, want 0", n)
	}
	// The count does see a round trip.
	rdCheck(t, "another key", rdServe(h, other), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "other"})
	if n := rdEvalCalls(t, c); n != 1 {
		t.Errorf("Redis ran %d scripts for one request of another key, want 1", n)
	}

	// Without Redis, the remembered denial still answers: not a fallback
	// to local counting (which would admit).
	r.Stop()
	rdCheck(t, "in the retry window, Redis gone", rdServe(h, over), denied)
	if h.redis.down.Load() {
		t.Error("Redis marked down by a request that needed no round trip")
	}
	rdCheck(t, "another key, Redis gone", rdTimed(t, h, other), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "other", degraded: degradedLocalLimits})
}

// TestRedisPreCheckExpires checks that the pre-check refuses a key only
// until its retry time: then Redis decides again and admits it.
func TestRedisPreCheckExpires(t *testing.T) {
	r := StartTestRedis(t)
	c := rdClient(t, r)
	key := rdKey(t, "k")
	h := rdLimitsHandler(t, r, key, "1/1s", "", 2*time.Second)
	rdCheck(t, "request 1", rdServe(h, key), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "shared"})
	rdCheck(t, "request 2", rdServe(h, key), rdWant{status: http.StatusTooManyRequests, outcome: outcomeRateLimited, id: "shared", retry: "1"})
	if err := c.ConfigResetStat(context.Background()).Err(); err != nil {
		t.Fatalf("CONFIG RESETSTAT: %v", err)
	}
	rdWait(t, 5*time.Second, "admitted again after its retry time", func() string {
		res := rdServe(h, key)
		if res.status == http.StatusOK {
			return rdMismatch(res, rdWant{status: http.StatusOK, outcome: outcomeOK, id: "shared"})
		}
		if m := rdMismatch(res, rdWant{status: http.StatusTooManyRequests, outcome: outcomeRateLimited, id: "shared", retry: "1"}); m != "" {
			return m
		}
		return "still refused"
	})
	if n := rdEvalCalls(t, c); n < 1 {
		t.Errorf("Redis ran %d scripts, want the admission decided there", n)
	}
}

// TestRedisPreCheckPerLimit checks that the pre-check remembers a denial
// for the limits that denied it: the same key under other limits on the
// same Redis backend (another site, or the config after a reload) is
// decided by its own counters, as the local limiter and Redis's counters
// (keyed by the limit) decide it.
func TestRedisPreCheckPerLimit(t *testing.T) {
	r := StartTestRedis(t)
	tests := []struct {
		name          string
		rateA, quotaA string
		rateB, quotaB string
		deniedA       string
	}{
		{"other rate", "1/1m", "", "100/1m", "", outcomeRateLimited},
		{"quota raised on reload", "", "1/day", "", "10/day", outcomeQuotaExceeded},
		{"no quota elsewhere", "", "1/day", "100/1m", "", outcomeQuotaExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.quotaA != "" {
				polSecsToMidnight(t)
			}
			key := rdKey(t, "k")
			a := rdLimitsHandler(t, r, key, tt.rateA, tt.quotaA, defaultRedisTimeout)
			b := rdLimitsHandler(t, r, key, tt.rateB, tt.quotaB, defaultRedisTimeout)
			if a.redis != b.redis {
				t.Fatal("the handlers do not share a backend")
			}
			ok := rdWant{status: http.StatusOK, outcome: outcomeOK, id: "shared"}
			rdCheck(t, "A, request 1", rdServe(a, key), ok)
			rdCheck(t, "A, request 2", rdServe(a, key), rdWant{status: http.StatusTooManyRequests, outcome: tt.deniedA, id: "shared", retry: "+"})
			rdCheck(t, "B, within its own limits", rdServe(b, key), ok)
		})
	}
}

// TestRedisPreCheckKeyChanged checks that a published change of a key's
// limits in Redis takes effect within 1 s, as a revocation does, even
// after Redis denied the key under its old limits: here its quota of
// 1/day is replaced by a rate.
func TestRedisPreCheckKeyChanged(t *testing.T) {
	polSecsToMidnight(t)
	r := StartTestRedis(t)
	c := rdClient(t, r)
	key := rdKey(t, "k")
	rdPut(t, c, key, keyFileEntry{ID: "k", Quota: "1/day"})
	h := rdHandler(t, r, &Handler{Store: "redis", Limits: "redis"})
	ok := rdWant{status: http.StatusOK, outcome: outcomeOK, id: "k"}
	rdCheck(t, "request 1", rdServe(h, key), ok)
	rdCheck(t, "request 2", rdServe(h, key), rdWant{status: http.StatusTooManyRequests, outcome: outcomeQuotaExceeded, id: "k", retry: "+"})

	ctx := context.Background()
	if err := c.HDel(ctx, defaultRedisPrefix+"key:"+rdHex(key), "quota").Err(); err != nil {
		t.Fatalf("HDEL: %v", err)
	}
	if err := c.HSet(ctx, defaultRedisPrefix+"key:"+rdHex(key), "rate", "100/1m").Err(); err != nil {
		t.Fatalf("HSET: %v", err)
	}
	rdPublish(t, c, key)
	rdWait(t, time.Second, "the key's new limits apply once published", func() string {
		return rdMismatch(rdServe(h, key), ok)
	})
}

// TestRedisStoreDown checks on_store_error with Redis stopped: deny
// refuses every key, allow_cached admits cached keys with a degraded log
// field; unknown keys are never admitted, nothing is a 5xx, the outage
// and the recovery are logged once each, and once Redis is back requests
// are answered normally.
func TestRedisStoreDown(t *testing.T) {
	for _, mode := range []string{storeErrorDeny, storeErrorAllowCached} {
		t.Run(mode, func(t *testing.T) {
			rdFastWatch(t)
			r := StartTestRedis(t)
			c := rdClient(t, r)
			cached, uncached, unknown := rdKey(t, "cached"), rdKey(t, "uncached"), rdKey(t, "unknown")
			rdPut(t, c, cached, keyFileEntry{ID: "cached"})
			rdPut(t, c, uncached, keyFileEntry{ID: "uncached"})
			h := rdHandler(t, r, &Handler{Store: "redis", OnStoreError: mode})
			logs := rdObserve(h)
			okCached := rdWant{status: http.StatusOK, outcome: outcomeOK, id: "cached"}
			unavailable := rdWant{status: http.StatusUnauthorized, outcome: outcomeStoreUnavailable, retry: "1"}

			rdCheck(t, "cached key, Redis up", rdServe(h, cached), okCached)
			rdCheck(t, "unknown key, Redis up", rdServe(h, unknown), rdWant{status: http.StatusUnauthorized, outcome: outcomeInvalid})
			h.cache.c.Wait()

			r.Stop()
			// A failed lookup is that request's failure; the watcher's
			// pings (two failed in a row) mark Redis down.
			rdCheck(t, "uncached key, Redis down", rdTimed(t, h, uncached), unavailable)
			rdWaitDown(t, h)
			for range 3 {
				if mode == storeErrorDeny {
					rdCheck(t, "cached key, Redis down", rdTimed(t, h, cached), unavailable)
				} else {
					rdCheck(t, "cached key, Redis down", rdTimed(t, h, cached), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "cached", degraded: degradedCachedKey})
				}
				rdCheck(t, "uncached key, Redis down", rdTimed(t, h, uncached), unavailable)
				// Known not to exist: still refused as such.
				rdCheck(t, "unknown key, Redis down", rdTimed(t, h, unknown), rdWant{status: http.StatusUnauthorized, outcome: outcomeInvalid})
			}
			if n := rdLogCount(logs, rdLogDown); n != 1 {
				t.Errorf("%d log entries %q for one outage, want 1", n, rdLogDown)
			}

			r.Start()
			// The restarted Redis is empty: the keys come back as the CLI
			// would write them.
			rdPut(t, c, cached, keyFileEntry{ID: "cached"})
			rdPut(t, c, uncached, keyFileEntry{ID: "uncached"})
			rdWait(t, 5*time.Second, "answered normally once Redis is back", func() string {
				return rdMismatch(rdServe(h, cached), okCached)
			})
			rdCheck(t, "uncached key, Redis back", rdServe(h, uncached), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "uncached"})
			if n := rdLogCount(logs, rdLogUp); n != 1 {
				t.Errorf("%d log entries %q, want 1", n, rdLogUp)
			}
			if n := rdLogCount(logs, rdLogDown); n != 1 {
				t.Errorf("%d log entries %q for one outage, want 1", n, rdLogDown)
			}
		})
	}
}

// TestRedisStoreDownReload checks that a config reload while Redis is
// down keeps the cache: with on_store_error allow_cached, a key cached
// before the outage is still admitted by the new config's handler when
// its configuration is unchanged, and a changed configuration starts with
// an empty cache (it may hold other inline keys or plans).
func TestRedisStoreDownReload(t *testing.T) {
	rdFastWatch(t)
	r := StartTestRedis(t)
	c := rdClient(t, r)
	cached := rdKey(t, "cached")
	rdPut(t, c, cached, keyFileEntry{ID: "cached"})
	quotaFile := filepath.Join(t.TempDir(), "quotas.db")
	config := func(name string) *Handler {
		return &Handler{Store: "redis", OnStoreError: storeErrorAllowCached, Name: name,
			Redis: &RedisConfig{Addresses: []string{r.Addr}}, QuotaFile: quotaFile}
	}
	// The old config's handler, cleaned up by hand as a reload does.
	old := config("site")
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := old.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	rdWaitSubscribed(t, old)
	okCached := rdWant{status: http.StatusOK, outcome: outcomeOK, id: "cached"}
	rdCheck(t, "cached key, Redis up", rdServe(old, cached), okCached)
	old.cache.c.Wait()

	r.Stop()
	rdWaitDown(t, old)
	// The reload: the new config is provisioned, then the old cleaned up.
	same, changed := newTestHandler(t, config("site")), newTestHandler(t, config("other"))
	if err := old.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if same.cache != old.cache || changed.cache == old.cache {
		t.Fatal("the cache is shared with the wrong handler")
	}
	degraded := rdWant{status: http.StatusOK, outcome: outcomeOK, id: "cached", degraded: degradedCachedKey}
	rdCheck(t, "cached key after a reload, same config", rdTimed(t, same, cached), degraded)
	rdCheck(t, "cached key after a reload, changed config", rdTimed(t, changed, cached),
		rdWant{status: http.StatusUnauthorized, outcome: outcomeStoreUnavailable, retry: "1"})
}

// TestRedisStoreDownOnlyCachedKeys checks on_store_error deny when every
// request carries a cached key, so that no lookup fails: the backend must
// notice by itself that Redis is gone (its subscription is lost, and its
// watcher can ping), and refuse cached keys.
func TestRedisStoreDownOnlyCachedKeys(t *testing.T) {
	rdFastWatch(t)
	r := StartTestRedis(t)
	c := rdClient(t, r)
	cached := rdKey(t, "cached")
	rdPut(t, c, cached, keyFileEntry{ID: "cached"})
	h := rdHandler(t, r, &Handler{Store: "redis", OnStoreError: storeErrorDeny})
	logs := rdObserve(h)
	rdCheck(t, "cached key, Redis up", rdServe(h, cached), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "cached"})
	h.cache.c.Wait()

	r.Stop()
	rdWait(t, 5*time.Second, "a cached key refused under on_store_error deny with Redis down", func() string {
		return rdMismatch(rdTimed(t, h, cached), rdWant{status: http.StatusUnauthorized, outcome: outcomeStoreUnavailable, retry: "1"})
	})
	if n := rdLogCount(logs, rdLogDown); n != 1 {
		t.Errorf("%d log entries %q for one outage, want 1", n, rdLogDown)
	}
}

// TestRedisLimiterDown checks on_limiter_error with Redis stopped: local
// counts on this server (rate 2/1m: the third request is refused), allow
// admits without counting, deny refuses with 429 limiter_unavailable;
// nothing is a 5xx or waits on Redis, the outage is logged once, and once
// Redis is back requests are counted there again.
func TestRedisLimiterDown(t *testing.T) {
	for _, mode := range []string{limiterErrorLocal, limiterErrorAllow, limiterErrorDeny} {
		t.Run(mode, func(t *testing.T) {
			rdFastWatch(t)
			r := StartTestRedis(t)
			key := rdKey(t, "k")
			h := rdHandler(t, r, &Handler{
				Keys:           []InlineKey{{ID: "k", Key: hashOf(key)}},
				Rate:           "2/1m",
				Limits:         "redis",
				OnLimiterError: mode,
			})
			logs := rdObserve(h)
			ok := rdWant{status: http.StatusOK, outcome: outcomeOK, id: "k"}
			res := rdServe(h, key)
			rdCheck(t, "Redis up", res, ok)
			if got := res.p.w.hdr.Get("RateLimit"); !strings.HasPrefix(got, `"default";r=1;`) {
				t.Errorf("RateLimit = %q, want r=1", got)
			}

			r.Stop()
			switch mode {
			case limiterErrorLocal:
				// This server's counters start from nothing: Redis's
				// count of the first request is not here.
				for i := range 2 {
					res := rdTimed(t, h, key)
					rdCheck(t, fmt.Sprintf("request %d, Redis down", i+1), res, rdWant{status: http.StatusOK, outcome: outcomeOK, id: "k", degraded: degradedLocalLimits})
					if got := res.p.w.hdr.Get("RateLimit"); !strings.HasPrefix(got, `"default";r=`+strconv.Itoa(1-i)+`;`) {
						t.Errorf("request %d: RateLimit = %q, want r=%d", i+1, got, 1-i)
					}
				}
				rdCheck(t, "request 3, Redis down", rdTimed(t, h, key), rdWant{status: http.StatusTooManyRequests, outcome: outcomeRateLimited, id: "k", retry: "+", degraded: degradedLocalLimits})
			case limiterErrorAllow:
				for i := range 5 {
					rdCheck(t, fmt.Sprintf("request %d, Redis down", i+1), rdTimed(t, h, key), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "k", degraded: degradedUnlimited})
				}
			case limiterErrorDeny:
				for i := range 3 {
					rdCheck(t, fmt.Sprintf("request %d, Redis down", i+1), rdTimed(t, h, key), rdWant{status: http.StatusTooManyRequests, outcome: outcomeLimiterUnavailable, id: "k", retry: "1"})
				}
			}
			rdWaitDown(t, h)
			if n := rdLogCount(logs, rdLogDown); n != 1 {
				t.Errorf("%d log entries %q for one outage, want 1", n, rdLogDown)
			}

			r.Start()
			rdWait(t, 5*time.Second, "counted in Redis again once it is back", func() string {
				return rdMismatch(rdServe(h, key), ok)
			})
			rdWait(t, 5*time.Second, "the watcher marks Redis up", func() string {
				if !h.redis.down.Load() {
					return ""
				}
				return "still marked down"
			})
			if n := rdLogCount(logs, rdLogUp); n != 1 {
				t.Errorf("%d log entries %q, want 1", n, rdLogUp)
			}
		})
	}
}

// TestRedisTimeoutWhenRedisHangs checks a Redis that accepts connections
// but answers nothing (CLIENT PAUSE): requests return after the timeout
// with the configured failure mode, not when Redis answers.
func TestRedisTimeoutWhenRedisHangs(t *testing.T) {
	r := StartTestRedis(t)
	c := rdClient(t, r)
	limited, stored := rdKey(t, "limited"), rdKey(t, "stored")
	rdPut(t, c, stored, keyFileEntry{ID: "stored"})
	limits := rdHandler(t, r, &Handler{Keys: []InlineKey{{ID: "limited", Key: hashOf(limited)}}, Rate: "100/1m", Limits: "redis"})
	store := rdHandler(t, r, &Handler{Store: "redis"})
	// Long enough that no answer can come back within the 2 s bound.
	if err := c.Do(context.Background(), "CLIENT", "PAUSE", "4000", "ALL").Err(); err != nil {
		t.Fatalf("CLIENT PAUSE: %v", err)
	}
	rdCheck(t, "limits redis, Redis hung", rdTimed(t, limits, limited), rdWant{status: http.StatusOK, outcome: outcomeOK, id: "limited", degraded: degradedLocalLimits})
	rdCheck(t, "store redis, Redis hung", rdTimed(t, store, stored), rdWant{status: http.StatusUnauthorized, outcome: outcomeStoreUnavailable, retry: "1"})
}

// TestRedisClientKind checks which go-redis client a redis block makes,
// without connecting (Cluster and Sentinel cannot run here): one address
// is one server, several a Cluster, master_name a Sentinel failover
// client; and the options redisOptions sets.
func TestRedisClientKind(t *testing.T) {
	t.Setenv("APIKEY_TEST_REDIS_PASSWORD", "s3cret")
	tests := []struct {
		name     string
		cfg      RedisConfig
		wantKind string // "client", "cluster" or "failover"
		wantAddr []string
	}{
		{"default", RedisConfig{}, "client", []string{defaultRedisAddress}},
		{"one address", RedisConfig{Addresses: []string{"10.0.0.1:6379"}}, "client", []string{"10.0.0.1:6379"}},
		{"cluster", RedisConfig{Addresses: []string{"10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"}}, "cluster", []string{"10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"}},
		{"sentinel", RedisConfig{Addresses: []string{"10.0.0.1:26379", "10.0.0.2:26379"}, MasterName: "mymaster"}, "failover", []string{"10.0.0.1:26379", "10.0.0.2:26379"}},
		{"one sentinel", RedisConfig{Addresses: []string{"10.0.0.1:26379"}, MasterName: "mymaster"}, "failover", []string{"10.0.0.1:26379"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.Password = "{env.APIKEY_TEST_REDIS_PASSWORD}"
			opts, schema, timeout, err := redisOptions(cfg, caddy.NewReplacer())
			if err != nil {
				t.Fatalf("redisOptions: %v", err)
			}
			if !reflect.DeepEqual(opts.Addrs, tt.wantAddr) {
				t.Errorf("Addrs = %q, want %q", opts.Addrs, tt.wantAddr)
			}
			if opts.Password != "s3cret" {
				t.Errorf("Password = %q, want the expanded placeholder", opts.Password)
			}
			if schema.prefix != defaultRedisPrefix || timeout != defaultRedisTimeout {
				t.Errorf("prefix %q, timeout %v; want %q, %v", schema.prefix, timeout, defaultRedisPrefix, defaultRedisTimeout)
			}
			for name, d := range map[string]time.Duration{"DialTimeout": opts.DialTimeout, "ReadTimeout": opts.ReadTimeout, "WriteTimeout": opts.WriteTimeout, "PoolTimeout": opts.PoolTimeout} {
				if d != defaultRedisTimeout {
					t.Errorf("%s = %v, want %v", name, d, defaultRedisTimeout)
				}
			}
			if opts.MaxRetries != -1 {
				t.Errorf("MaxRetries = %d, want -1 (no retry past the timeout)", opts.MaxRetries)
			}
			client := redis.NewUniversalClient(opts)
			defer client.Close()
			kind := fmt.Sprintf("%T", client)
			switch c := client.(type) {
			case *redis.ClusterClient:
				kind = "cluster"
			case *redis.Client:
				// A failover client is a *redis.Client that finds its
				// master through the Sentinels.
				kind = "client"
				if c.Options().Addr == "FailoverClient" {
					kind = "failover"
				}
			}
			if kind != tt.wantKind {
				t.Errorf("client = %T (%s), want %s", client, kind, tt.wantKind)
			}
		})
	}

	t.Run("settings", func(t *testing.T) {
		opts, schema, timeout, err := redisOptions(RedisConfig{KeyPrefix: "tenant1:", Timeout: caddy.Duration(200 * time.Millisecond), DB: 3, TLS: true, Username: "gw"}, caddy.NewReplacer())
		if err != nil {
			t.Fatalf("redisOptions: %v", err)
		}
		if schema.prefix != "tenant1:" || schema.channel() != "tenant1:events" || timeout != 200*time.Millisecond || opts.ReadTimeout != timeout {
			t.Errorf("prefix %q, channel %q, timeout %v, read timeout %v", schema.prefix, schema.channel(), timeout, opts.ReadTimeout)
		}
		if opts.DB != 3 || opts.Username != "gw" || opts.TLSConfig == nil {
			t.Errorf("DB %d, Username %q, TLSConfig %v; want 3, gw, set", opts.DB, opts.Username, opts.TLSConfig)
		}
		if _, _, _, err := redisOptions(RedisConfig{Timeout: caddy.Duration(-time.Second)}, caddy.NewReplacer()); err == nil {
			t.Error("a negative timeout is accepted")
		}
	})
}

// BenchmarkServeHTTPRedis is the hot path with Redis: a valid key from
// the cache whose rate limit is counted in Redis (a round trip per
// request), and a key kept in Redis found in a warm cache, counted
// locally (no round trip). Compare with BenchmarkServeHTTP/header/rate in
// the same run.
func BenchmarkServeHTTPRedis(b *testing.B) {
	r := StartTestRedis(b)
	c := rdClient(b, r)
	hdr := http.Header{"X-Api-Key": {testKeyA}}
	b.Run("limits-redis", func(b *testing.B) {
		h := rdHandler(b, r, &Handler{
			Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: "1000000000/1s", Limits: "redis",
			Redis: &RedisConfig{Addresses: []string{r.Addr}, Timeout: caddy.Duration(time.Second)},
		})
		reqs := benchRequests(1, func(int) http.Header { return hdr })
		runServeHTTP(b, h, reqs, false)
		// Every request counted in Redis, none locally.
		if f := rdLogField(reqs[0].prepared); h.redis.down.Load() || f["degraded"] != nil {
			b.Fatalf("Redis down during the benchmark (log field %v): the figure is not of counting in Redis", f)
		}
	})
	b.Run("store-redis-warm", func(b *testing.B) {
		rdPut(b, c, testKeyA, keyFileEntry{ID: "alpha"})
		h := rdHandler(b, r, &Handler{
			Store: "redis", Rate: "1000000000/1s",
			Redis: &RedisConfig{Addresses: []string{r.Addr}, Timeout: caddy.Duration(time.Second)},
		})
		if res := rdServe(h, testKeyA); res.status != http.StatusOK {
			b.Fatalf("warming the cache: status %d (err %v)", res.status, res.err)
		}
		h.cache.c.Wait()
		if err := c.ConfigResetStat(context.Background()).Err(); err != nil {
			b.Fatal(err)
		}
		runServeHTTP(b, h, benchRequests(1, func(int) http.Header { return hdr }), false)
		info, err := c.Info(context.Background(), "commandstats").Result()
		if err != nil {
			b.Fatal(err)
		}
		if strings.Contains(info, "cmdstat_hgetall:") {
			b.Fatal("keys were looked up in Redis during the benchmark: the cache was not warm")
		}
	})
}

func TestRedisOptionsRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  RedisConfig
		want string
	}{
		{"hash tag in the prefix", RedisConfig{KeyPrefix: "a{b:"}, "no { or }"},
		{"closing brace in the prefix", RedisConfig{KeyPrefix: "a}b:"}, "no { or }"},
		{"db with a Cluster", RedisConfig{Addresses: []string{"a:1", "b:2"}, DB: 3}, "Cluster, which has only database 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, _, err := redisOptions(tc.cfg, caddy.NewReplacer()); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("redisOptions = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if _, _, _, err := redisOptions(RedisConfig{Addresses: []string{"a:1", "b:2"}, DB: 3, MasterName: "m"}, caddy.NewReplacer()); err != nil {
		t.Fatalf("db with Sentinels: %v", err)
	}
}
