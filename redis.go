package apikey

import (
	"context"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keystile/caddy-apikey/internal/quota"
	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// RedisConfig connects the handler to Redis, where keys (store redis) and
// rate and quota counters (limits redis) can live, shared by several Caddy
// servers. One address is one server; several are a Cluster; with
// MasterName they are Sentinels.
type RedisConfig struct {
	// Addresses are host:port pairs. Default: 127.0.0.1:6379.
	Addresses []string `json:"addresses,omitempty"`

	// MasterName is the name of the master that the Sentinels at
	// Addresses watch. Default: none (no Sentinel).
	MasterName string `json:"master_name,omitempty"`

	// Username for Redis ACLs. Placeholders are expanded. Default: none
	// (the default user).
	Username string `json:"username,omitempty"`

	// Password, typically a placeholder such as {env.REDIS_PASSWORD},
	// expanded at provision. Default: none.
	Password string `json:"password,omitempty"`

	// DB is the database number (not with Cluster). Default: 0.
	DB int `json:"db,omitempty"`

	// TLS connects with TLS, verifying the server's certificate with the
	// system's roots. Default: false.
	TLS bool `json:"tls,omitempty"`

	// KeyPrefix starts every Redis key and the pub/sub channel this module
	// uses, so that several deployments can share a Redis. Default:
	// "apikey:".
	KeyPrefix string `json:"key_prefix,omitempty"`

	// Timeout bounds each Redis command; no request waits longer for
	// Redis. Default: 50ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`
}

// Redis defaults.
const (
	defaultRedisAddress = "127.0.0.1:6379"
	defaultRedisPrefix  = "apikey:"
	defaultRedisTimeout = 50 * time.Millisecond
)

// The failure modes, as configured.
const (
	storeErrorDeny        = "deny"
	storeErrorAllowCached = "allow_cached"

	limiterErrorLocal = "local"
	limiterErrorAllow = "allow"
	limiterErrorDeny  = "deny"
)

// Outcomes of requests that Redis could not answer.
const (
	outcomeStoreUnavailable   = "store_unavailable"
	outcomeLimiterUnavailable = "limiter_unavailable"
)

var (
	errStoreUnavailable   = errors.New("api key store unavailable")
	errLimiterUnavailable = errors.New("api key limiter unavailable")
)

// redisSchema names the Redis keys of one key prefix. Keys of one API key
// (its counters) share the hash tag {<hex digest>}, so that a decision's
// script touches one Cluster slot.
type redisSchema struct{ prefix string }

// keyKey is the hash that holds an API key's record.
func (s redisSchema) keyKey(hexDigest string) string { return s.prefix + "key:" + hexDigest }

// idKey maps a key id to its hex digest, for the CLI's edits by id.
func (s redisSchema) idKey(id string) string { return s.prefix + "id:" + id }

// channel is where every change of a key is published (its hex digest).
func (s redisSchema) channel() string { return s.prefix + "events" }

func (s redisSchema) rateKey(hexDigest string, lim ratelimit.Limit) string {
	return s.prefix + "rl:{" + hexDigest + "}:" + strconv.FormatInt(lim.Interval().Microseconds(), 10) + ":" + strconv.FormatInt(lim.Burst, 10)
}

func (s redisSchema) quotaKey(hexDigest string, q quota.Quota, start time.Time) string {
	return s.prefix + "q:{" + hexDigest + "}:" + q.Period.String() + ":" + strconv.FormatInt(start.Unix(), 10)
}

// redisHashFields are the keys-file fields a key's Redis hash may hold.
// Strings are stored as they are; burst as a number; disabled as true or
// false; metadata and the allow lists as JSON.
var redisJSONFields = map[string]bool{
	"metadata": true, "allow_ips": true, "allow_referrers": true, "allow_methods": true, "allow_paths": true,
}

// entryHash turns a keys-file entry into the fields of its Redis hash. The
// hash itself is the Redis key's name, not a field.
func entryHash(e keyFileEntry) (map[string]any, error) {
	raw, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, err
	}
	delete(fields, "hash")
	out := make(map[string]any, len(fields))
	for name, v := range fields {
		if redisJSONFields[name] {
			out[name] = string(v)
			continue
		}
		var s string
		if json.Unmarshal(v, &s) == nil {
			out[name] = s
		} else {
			out[name] = string(v) // numbers and booleans as JSON text
		}
	}
	return out, nil
}

// entryFromHash reads the Redis hash of the key with hexDigest back into a
// keys-file entry, so that it is checked exactly as a keys file is.
func entryFromHash(hexDigest string, fields map[string]string) (keyFileEntry, error) {
	obj := make(map[string]json.RawMessage, len(fields)+1)
	for name, v := range fields {
		switch {
		case redisJSONFields[name], name == "burst", name == "disabled":
			obj[name] = json.RawMessage(v)
		default:
			b, _ := json.Marshal(v)
			obj[name] = b
		}
	}
	h, _ := json.Marshal(digestPrefix + hexDigest)
	obj["hash"] = h
	raw, err := json.Marshal(obj)
	if err != nil {
		return keyFileEntry{}, err
	}
	var e keyFileEntry
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return keyFileEntry{}, err
	}
	return e, nil
}

// redisOptions turns a RedisConfig, with placeholders expanded, into
// go-redis options.
func redisOptions(cfg RedisConfig, repl *caddy.Replacer) (*redis.UniversalOptions, redisSchema, time.Duration, error) {
	timeout := time.Duration(cfg.Timeout)
	if timeout == 0 {
		timeout = defaultRedisTimeout
	}
	if timeout < 0 {
		return nil, redisSchema{}, 0, errors.New("redis: timeout must be positive")
	}
	addrs := make([]string, 0, len(cfg.Addresses))
	for _, a := range cfg.Addresses {
		addrs = append(addrs, repl.ReplaceKnown(a, ""))
	}
	if len(addrs) == 0 {
		addrs = []string{defaultRedisAddress}
	}
	prefix := cfg.KeyPrefix
	if prefix == "" {
		prefix = defaultRedisPrefix
	}
	// Braces would make the prefix a Cluster hash tag, and an API key's
	// counters would then not share a slot.
	if strings.ContainsAny(prefix, "{}") {
		return nil, redisSchema{}, 0, fmt.Errorf("redis: key_prefix %q: no { or } (they would be a Cluster hash tag)", prefix)
	}
	if cfg.DB != 0 && len(addrs) > 1 && cfg.MasterName == "" {
		return nil, redisSchema{}, 0, errors.New("redis: db: several addresses are a Cluster, which has only database 0")
	}
	opts := &redis.UniversalOptions{
		Addrs:                 addrs,
		MasterName:            cfg.MasterName,
		Username:              repl.ReplaceKnown(cfg.Username, ""),
		Password:              repl.ReplaceKnown(cfg.Password, ""),
		DB:                    cfg.DB,
		DialTimeout:           timeout,
		ReadTimeout:           timeout,
		WriteTimeout:          timeout,
		PoolTimeout:           timeout,
		ContextTimeoutEnabled: true,
		// A retry would wait past the timeout; the failure modes decide
		// instead.
		MaxRetries:    -1,
		DialerRetries: 1,
	}
	if cfg.TLS {
		opts.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return opts, redisSchema{prefix: prefix}, timeout, nil
}

// redisBackend is one Redis connection shared, through a caddy.UsagePool,
// by every handler configured with the same Redis, so that it outlives
// config reloads. It listens on the change channel and tells caches to
// forget what changed, watches Redis's health and logs each change of it
// once, and remembers keys that Redis has denied for a while, so that
// they are refused without a round trip.
type redisBackend struct {
	client  redis.UniversalClient
	schema  redisSchema
	timeout time.Duration
	logger  atomic.Pointer[zap.Logger]

	// gen changes with every published change of a key and every
	// (re)subscription (changes may have been missed while away); cached
	// lookups from another generation are misses.
	gen atomic.Uint64
	// down is set when the watcher's ping has failed twice in a row, and
	// cleared when one succeeds. A request's own failed command does not
	// set it: an error reply, a full connection pool or a slow command is
	// that request's failure (its failure mode applies), not an outage.
	down atomic.Bool
	// subscribed tells whether changes are being heard; while they are
	// not, the cache ttl bounds how long a revoked key works.
	subscribed atomic.Bool

	denied deniedKeys

	ps      *redis.PubSub // closed by Destruct, which ends a Receive in wait
	cancel  context.CancelFunc
	stopped sync.WaitGroup
}

// redisGenBase keeps the generations of Redis lookups apart from those of
// key sets, which count up from 1.
const redisGenBase = 1 << 62

// redisLogOnce routes go-redis's own log lines (reconnection attempts and
// the like, which it writes to stderr by default) to Caddy's log at debug
// level: the backend logs what matters, once per change of health.
var redisLogOnce sync.Once

type redisLog struct{}

func (redisLog) Printf(_ context.Context, format string, v ...any) {
	caddy.Log().Named("api_key.redis").Debug(fmt.Sprintf(format, v...))
}

func newRedisBackend(opts *redis.UniversalOptions, schema redisSchema, timeout time.Duration, logger *zap.Logger) *redisBackend {
	redisLogOnce.Do(func() { redis.SetLogger(redisLog{}) })
	b := &redisBackend{client: redis.NewUniversalClient(opts), schema: schema, timeout: timeout}
	b.logger.Store(logger)
	b.gen.Store(redisGenBase)
	b.denied.init()
	ctx, cancel := context.WithCancel(context.Background())
	b.cancel = cancel
	// Subscribe connects lazily, in Receive.
	b.ps = b.client.Subscribe(ctx, schema.channel())
	b.stopped.Add(2)
	go b.listen(ctx)
	go b.watch(ctx)
	return b
}

// command returns a context for one Redis command of a request: it ends
// at the timeout, or when the request does.
func (b *redisBackend) command(parent context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, b.timeout)
}

// health records the result of a watcher's ping and logs a change of
// state once.
func (b *redisBackend) health(err error, failures *int) {
	if err == nil {
		*failures = 0
		if b.down.Swap(false) {
			b.logger.Load().Info("redis available again")
		}
		return
	}
	if *failures++; *failures >= 2 && !b.down.Swap(true) {
		b.logger.Load().Error("redis unavailable; the configured failure modes apply until it is back", zap.Error(err))
	}
}

// listen follows the change channel. go-redis subscribes again after a
// lost connection; every subscription confirmation bumps the generation,
// since changes made in between were not heard.
func (b *redisBackend) listen(ctx context.Context) {
	defer b.stopped.Done()
	lost := false
	for {
		// Receive does not end when ctx does; Destruct closes the
		// PubSub, which ends it.
		msg, err := b.ps.Receive(ctx)
		if ctx.Err() != nil {
			return
		}
		switch msg.(type) {
		case *redis.Subscription:
			if !b.subscribed.Swap(true) && lost {
				b.logger.Load().Info("redis change channel back; changes of keys take effect at once again")
			}
			b.gen.Add(1)
		case *redis.Message:
			b.gen.Add(1)
		}
		if err != nil {
			if b.subscribed.Swap(false) || !lost {
				lost = true
				b.logger.Load().Warn("redis change channel lost; changes of keys take effect within the cache ttl until it is back",
					zap.String("channel", b.schema.channel()), zap.Error(err))
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
	}
}

// redisWatchInterval is how often Redis's health is checked (and denied
// keys are swept).
var redisWatchInterval = time.Second

// watch pings Redis every interval, so that an outage is noticed even
// when every request is answered from the cache (on_store_error deny
// must then refuse them), and recovery without a request having to
// succeed first; and it sweeps the denied keys.
func (b *redisBackend) watch(ctx context.Context) {
	defer b.stopped.Done()
	t := time.NewTicker(redisWatchInterval)
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := b.command(ctx)
		err := b.client.Ping(cctx).Err()
		cancel()
		if ctx.Err() != nil {
			return
		}
		b.health(err, &failures)
		b.denied.sweep(time.Now().UnixNano())
	}
}

// lookup reads the record of the key with this digest from Redis: nil if
// there is none.
func (b *redisBackend) lookup(ctx context.Context, digest *[32]byte) (*keyRecord, error) {
	hexDigest := hex.EncodeToString(digest[:])
	cctx, cancel := b.command(ctx)
	fields, err := b.client.HGetAll(cctx, b.schema.keyKey(hexDigest)).Result()
	cancel()
	if err != nil {
		return nil, err
	}
	if len(fields) == 0 {
		return nil, nil
	}
	e, err := entryFromHash(hexDigest, fields)
	if err != nil {
		return nil, badRecordError{fmt.Errorf("redis key %s: %w", b.schema.keyKey(hexDigest[:12]+"…"), err)}
	}
	rec, err := e.record()
	if err != nil {
		return nil, badRecordError{fmt.Errorf("redis key %s (id %q): %w", b.schema.keyKey(hexDigest[:12]+"…"), e.ID, err)}
	}
	return rec, nil
}

// badRecordError is a key record in Redis that does not check out: the
// key is treated as unknown, and Redis as up.
type badRecordError struct{ err error }

func (e badRecordError) Error() string { return e.err.Error() }
func (e badRecordError) Unwrap() error { return e.err }

// decideScript decides one request against a key's rate limit and quota
// in one round trip, on Redis's clock. KEYS: the rate key if ARGV[1] is
// "1", then the quota key if ARGV[2] is "1". ARGV[3], ARGV[4]: the
// interval in microseconds and the burst; ARGV[5], ARGV[6]: the quota's
// count and the Unix time its counter expires. The quota is checked first
// and counted last, so a request refused by either counts against
// neither. Returns {code, remaining, reset µs, retry µs, quota used}:
// code 0 allowed, 1 over the rate, 2 over the quota. It is GCRA as
// ratelimit.Limit.Decide does it, in microseconds.
var decideScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local i = 1
local rk, qk
if ARGV[1] == '1' then rk = KEYS[i]; i = i + 1 end
if ARGV[2] == '1' then qk = KEYS[i] end
local used = 0
if qk then
  used = tonumber(redis.call('GET', qk) or '0')
  if used >= tonumber(ARGV[5]) then return {2, 0, 0, 0, used} end
end
local remaining, reset = 0, 0
if rk then
  local interval = tonumber(ARGV[3])
  local window = interval * tonumber(ARGV[4])
  local tat = tonumber(redis.call('GET', rk) or '0')
  if tat < now then tat = now end
  local nxt = tat + interval
  if nxt - now > window then
    return {1, 0, tat - now, nxt - window - now, used}
  end
  redis.call('SET', rk, string.format('%.0f', nxt), 'PX', math.ceil((nxt - now) / 1000) + 1000)
  remaining = math.floor((window - (nxt - now)) / interval)
  reset = nxt - now
end
if qk then
  used = redis.call('INCR', qk)
  if used == 1 then redis.call('EXPIREAT', qk, tonumber(ARGV[6])) end
end
return {0, remaining, reset, 0, used}
`)

// limitDecision is the decision on a request's rate limit and quota,
// whether Redis or this server made it.
type limitDecision struct {
	rate  ratelimit.Decision
	quota quota.Decision
	// over is outcomeRateLimited or outcomeQuotaExceeded when denied.
	over string
	// inRedis tells that Redis decided (or a remembered answer of it).
	inRedis bool
}

// decide counts one request by the key against lim and q (either may be
// zero) in Redis.
func (b *redisBackend) decide(ctx context.Context, digest *[32]byte, lim ratelimit.Limit, q quota.Quota) (limitDecision, error) {
	hexDigest := hex.EncodeToString(digest[:])
	keys := make([]string, 0, 2)
	hasRate, hasQuota := "0", "0"
	var interval int64
	if !lim.IsZero() {
		hasRate = "1"
		keys = append(keys, b.schema.rateKey(hexDigest, lim))
		interval = max(1, lim.Interval().Microseconds())
	}
	now := time.Now()
	var start, end time.Time
	if !q.IsZero() {
		hasQuota = "1"
		start, end = q.Period.Bounds(now)
		keys = append(keys, b.schema.quotaKey(hexDigest, q, start))
	}
	// The counter outlives its period by one more, as the local store's
	// does, for requests racing the boundary.
	expireAt := end.Add(end.Sub(start)).Unix()
	cctx, cancel := b.command(ctx)
	res, err := decideScript.Run(cctx, b.client, keys, hasRate, hasQuota, interval, lim.Burst, q.Count, expireAt).Int64Slice()
	cancel()
	if err != nil {
		return limitDecision{}, err
	}
	if len(res) != 5 {
		return limitDecision{}, fmt.Errorf("redis decide script: %d values, want 5", len(res))
	}
	d := limitDecision{inRedis: true}
	d.rate = ratelimit.Decision{
		Allowed:    res[0] == 0,
		Remaining:  res[1],
		Reset:      time.Duration(res[2]) * time.Microsecond,
		RetryAfter: time.Duration(res[3]) * time.Microsecond,
	}
	if !q.IsZero() {
		used := res[4]
		d.quota = quota.Decision{
			Allowed:   res[0] != 2,
			Used:      used,
			Remaining: max(0, q.Count-used),
			Reset:     end.Sub(now),
			Window:    end.Sub(start),
		}
	}
	switch res[0] {
	case 1:
		d.over = outcomeRateLimited
	case 2:
		d.over = outcomeQuotaExceeded
	}
	return d, nil
}

// Destruct stops the listener and the watcher and closes the connection,
// once no handler uses the backend any more.
func (b *redisBackend) Destruct() error {
	b.cancel()
	_ = b.ps.Close()
	b.stopped.Wait()
	return b.client.Close()
}

var _ caddy.Destructor = (*redisBackend)(nil)

// deniedKeys remembers, per key digest, that Redis denied it and until
// when, with the decision, so that a key that is clearly over its limit
// is refused without a round trip (the local pre-check). Entries are
// swept once they are past.
type deniedKeys struct {
	shards [16]struct {
		mu sync.Mutex
		m  map[deniedID]deniedKey
	}
}

// deniedID is what a denial was about: a key under given limits. The same
// key under other limits (another site, a changed config) is decided
// afresh.
type deniedID struct {
	digest [32]byte
	lim    ratelimit.Limit
	quota  quota.Quota
}

type deniedKey struct {
	at    int64  // unix nanoseconds of the decision
	until int64  // unix nanoseconds
	gen   uint64 // the backend's generation then: a published change ends it
	d     limitDecision
}

func (dk *deniedKeys) init() {
	for i := range dk.shards {
		dk.shards[i].m = make(map[deniedID]deniedKey)
	}
}

// get returns the remembered denial of id, if one still holds at now in
// generation gen.
func (dk *deniedKeys) get(id *deniedID, now int64, gen uint64) (deniedKey, bool) {
	s := &dk.shards[id.digest[0]%16]
	s.mu.Lock()
	e, ok := s.m[*id]
	s.mu.Unlock()
	if !ok || now >= e.until || e.gen != gen {
		return deniedKey{}, false
	}
	return e, true
}

func (dk *deniedKeys) put(id *deniedID, e deniedKey) {
	s := &dk.shards[id.digest[0]%16]
	s.mu.Lock()
	s.m[*id] = e
	s.mu.Unlock()
}

func (dk *deniedKeys) sweep(now int64) {
	for i := range dk.shards {
		s := &dk.shards[i]
		s.mu.Lock()
		for k, e := range s.m {
			if now >= e.until {
				delete(s.m, k)
			}
		}
		s.mu.Unlock()
	}
}
