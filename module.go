package apikey

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/textproto"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/keystile/caddy-apikey/internal/keyformat"
	"github.com/keystile/caddy-apikey/internal/quota"
	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler requires an API key on every request it handles. It finds the key
// in the request (an Authorization: Bearer header, another header, a query
// parameter or a cookie), looks its SHA-256 digest up among the configured
// keys, applies the key's rate limit, and names the key in placeholders and
// in the access log. A request without a known key gets 401, one over its
// key's rate limit 429; both go through Caddy's error handling, so
// handle_errors can shape them.
//
// Placeholders set for handlers that come after it, and for handle_errors:
//
// Placeholder | Description
// ------------|-------------
// `{http.api_key.id}` | The id of the key (not the key itself).
// `{http.api_key.name}` | The key's name.
// `{http.api_key.owner}` | The key's owner.
// `{http.api_key.plan}` | The key's plan.
// `{http.api_key.metadata.*}` | A field of the key's metadata.
// `{http.api_key.outcome}` | ok, missing, invalid, disabled, expired, not_yet_valid, forbidden, rate_limited, quota_exceeded, or with Redis down store_unavailable or limiter_unavailable.
// `{http.api_key.restriction}` | For forbidden: the restriction that failed (ip, referrer, method or path).
// `{http.auth.user.id}` | The id of the key, as Caddy's auth handlers set it; the access log prints it as user_id.
//
// API keys identify the calling project or application. They are not user
// identity and not secure authorization.
type Handler struct {
	// From lists where to look for the key, in order. Each source is one of
	// "bearer" (Authorization: Bearer <key>), "header" (a request header),
	// "query" (a query parameter) or "cookie" (a cookie); all but bearer
	// need a name. A request that carries two different keys is rejected.
	// Default: bearer, then the X-API-Key header.
	From []KeySource `json:"from,omitempty"`

	// KeysFile is the path of a JSON keys file: {"keys": [{"id": ...,
	// "hash": "sha256:<hex>", ...}]}. It is checked for changes every
	// second and reloaded when valid; an invalid file keeps the previous
	// keys in use. Placeholders such as {env.KEYS_FILE} are expanded.
	KeysFile string `json:"keys_file,omitempty"`

	// Keys are keys given in the config. At least one of KeysFile and Keys
	// is required.
	Keys []InlineKey `json:"keys,omitempty"`

	// Rate is the rate limit of every key that has none of its own, as
	// "<count>/<duration>", for example "600/1m". Default: no limit.
	Rate string `json:"rate,omitempty"`

	// Burst is how many requests a key may make at once under Rate.
	// Default: the count of Rate.
	Burst int64 `json:"burst,omitempty"`

	// Quota caps the calls of every key that has none of its own (nor its
	// plan) per UTC calendar period, as "<count>/<hour|day|week|month>",
	// for example "10000/month". Counts survive reloads and restarts (see
	// QuotaFile). Default: no quota.
	Quota string `json:"quota,omitempty"`

	// Plans are named sets of limits and restrictions; a key in the keys
	// file takes one with "plan": "<name>". Default: none.
	Plans map[string]*Plan `json:"plans,omitempty"`

	// Prefixes are the prefixes of keys this site issues in the
	// <prefix>_<random><checksum> format (see caddy api-key generate). A key
	// that carries one but fails its checksum is rejected without a lookup.
	// Default: none (every key is looked up).
	Prefixes []string `json:"prefixes,omitempty"`

	// QuotaFile is where quota counts are kept (a bbolt database). One
	// Caddy process at a time may use a file. Default:
	// api_key/quotas.db in Caddy's data directory.
	QuotaFile string `json:"quota_file,omitempty"`

	// Redis connects to Redis, for keys (Store) and counters (Limits)
	// that several Caddy servers share.
	Redis *RedisConfig `json:"redis,omitempty"`

	// Store is where keys are looked up: "file" (the keys file and the
	// keys given in the config) or "redis" (the keys given in the config,
	// then Redis; needs Redis and no keys file). Default: file.
	Store string `json:"store,omitempty"`

	// Limits is where rate-limit and quota counters live: "local" (this
	// Caddy process; quotas in QuotaFile) or "redis" (shared by every
	// server that uses the same Redis). Default: local.
	Limits string `json:"limits,omitempty"`

	// OnStoreError says what happens, with Store redis, while Redis cannot
	// be reached: "deny" refuses every key (401, outcome
	// store_unavailable); "allow_cached" keeps admitting keys found in the
	// cache. Keys not in the cache are never admitted. Default: deny.
	OnStoreError string `json:"on_store_error,omitempty"`

	// OnLimiterError says what happens, with Limits redis, while Redis
	// cannot be reached: "local" counts on this server's own counters,
	// "allow" admits without counting, "deny" refuses (429, outcome
	// limiter_unavailable). Default: local.
	OnLimiterError string `json:"on_limiter_error,omitempty"`

	// MaxFailures is the brute-force guard: after this many failed key
	// attempts (invalid keys) in this time, as "<count>/<duration>", a
	// client address (Caddy's, so trusted_proxies is honoured) gets 429,
	// outcome too_many_failures, before any lookup, until its failures
	// have run out at that rate. "off" turns the guard off. Default: 20/1m.
	MaxFailures string `json:"max_failures,omitempty"`

	// Name identifies the handler in the admin API's answers, for example
	// the site's address. Default: its keys file's path, "redis" with
	// store redis, or "config" for keys given in the config only.
	Name string `json:"name,omitempty"`

	// Metrics turns on per-key series. The other metrics are always on.
	Metrics *MetricsConfig `json:"metrics,omitempty"`

	// Cache configures the cache of key lookups.
	Cache *CacheConfig `json:"cache,omitempty"`

	// Realm is the realm named in the WWW-Authenticate challenge of a 401
	// response. Default: api.
	Realm string `json:"realm,omitempty"`

	// Refusals says how a refused request (401, 403, 429) ends. auto:
	// on a server with error routes (handle_errors) the refusal is
	// returned as an error, for them to shape; on a server without, the
	// handler writes the status itself, sparing Caddy's error path (which
	// encodes the whole request into every log output for its error log).
	// errors: always returned as an error, as for a handle_errors that
	// the server does not show, such as a JSON subroute's own errors
	// routes. Default: auto.
	Refusals string `json:"refusals,omitempty"`

	// PassKey keeps the key in the request handed to the next handler (for
	// example a backend behind reverse_proxy that reads it too). By
	// default the key is removed: the header, the query parameter or the
	// cookie it came in. Default: false.
	PassKey bool `json:"pass_key,omitempty"`

	sources       []source
	inline        map[[32]byte]*keyRecord
	keysFile      *keysFile
	keysFileKey   string
	cache         *keyCache
	cacheKey      string // its name in cachePool, if it is shared
	limiter       *limiter
	limiterLoaded bool
	defaultLimit  ratelimit.Limit
	defaultPolicy policy
	defaultQuota  quota.Quota
	plans         map[string]*plan
	prefixes      []string
	quotas        *quotaRef
	now           func() int64 // unix nanoseconds, for expiry

	guard          *failGuard // nil when max_failures is off
	perKeyMax      int        // 0: no per-key series
	name           string     // Name, or its default
	redis          *redisBackend
	redisKey       string
	redisStore     bool
	redisLimits    bool
	onStoreError   string
	onLimiterError string
	challengeMiss  string
	challengeBad   string
	logger         *zap.Logger
}

// KeySource is one place a key may be found in a request.
type KeySource struct {
	// Source is "bearer", "header", "query" or "cookie".
	Source string `json:"source"`

	// Name is the header, query parameter or cookie name. Not used with
	// bearer.
	Name string `json:"name,omitempty"`
}

func (s KeySource) String() string {
	if s.Name == "" {
		return s.Source
	}
	return s.Source + " " + s.Name
}

// InlineKey is one key given in the config.
type InlineKey struct {
	// ID names the key in logs and placeholders.
	ID string `json:"id"`

	// Key is the key's SHA-256 digest as "sha256:<64 hex digits>", or the
	// key itself, usually as a placeholder such as {env.CI_KEY}: it is
	// expanded and hashed at provision and not kept. The Caddyfile adapter
	// hashes a literal key, so that it never reaches the JSON config; in
	// JSON, give a placeholder or the digest, since Caddy keeps its config.
	Key string `json:"key"`
}

// CacheConfig sizes the cache of key lookups.
type CacheConfig struct {
	// Size is the most lookups kept, found and not found together.
	// Default: 100000.
	Size int64 `json:"size,omitempty"`

	// TTL is how long a found key is cached. Default: 5m.
	TTL caddy.Duration `json:"ttl,omitempty"`

	// NegativeTTL is how long a key that was not found is cached. Only
	// with store redis: with the keys in memory (a keys file, inline
	// keys) an unknown key is looked up again, which costs less than
	// remembering it. Default: 30s.
	NegativeTTL caddy.Duration `json:"negative_ttl,omitempty"`
}

// Defaults.
const (
	defaultCacheSize   = 100000
	defaultCacheTTL    = 5 * time.Minute
	defaultNegativeTTL = 30 * time.Second
	defaultRealm       = "api"
	refusalsAuto       = "auto"
	refusalsErrors     = "errors"
)

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.api_key",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler: it compiles the key sources, loads the
// keys, and joins the shared limiter.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	if h.Metrics != nil && h.Metrics.PerKey {
		h.perKeyMax = h.Metrics.MaxKeys
		if h.perKeyMax == 0 {
			h.perKeyMax = defaultMetricsMaxKeys
		}
		if h.perKeyMax < 0 {
			return errors.New("metrics: max_keys must be positive")
		}
	}
	repl := caddy.NewReplacer()

	sources := h.From
	if len(sources) == 0 {
		sources = []KeySource{{Source: "bearer"}, {Source: "header", Name: "X-API-Key"}}
	}
	if len(sources) > maxSources {
		return fmt.Errorf("from: at most %d sources", maxSources)
	}
	h.sources = h.sources[:0]
	for _, s := range sources {
		src, err := compileSource(s)
		if err != nil {
			return err
		}
		h.sources = append(h.sources, src)
	}
	h.warnLoggedSources()
	h.warnIdleSettings()

	h.inline = make(map[[32]byte]*keyRecord, len(h.Keys))
	ids := make(map[string]bool, len(h.Keys))
	for i, k := range h.Keys {
		if err := checkID(k.ID); err != nil {
			return fmt.Errorf("keys[%d]: %w", i, err)
		}
		if ids[k.ID] {
			return fmt.Errorf("keys[%d] (id %q): duplicate id", i, k.ID)
		}
		ids[k.ID] = true
		digest, err := inlineDigest(repl, k)
		if err != nil {
			return fmt.Errorf("keys[%d] (id %q): %w", i, k.ID, err)
		}
		if other, dup := h.inline[digest]; dup {
			return fmt.Errorf("keys[%d] (id %q): same key as id %q", i, k.ID, other.id)
		}
		h.inline[digest] = newKeyRecord(&keyRecord{id: k.ID, digest: digest})
		// The key itself is not kept, not even in the config struct.
		h.Keys[i].Key = digestPrefix + hex.EncodeToString(digest[:])
	}

	if h.Rate != "" {
		lim, err := ratelimit.ParseRate(h.Rate)
		if err != nil {
			return err
		}
		if h.Burst != 0 {
			lim.Burst = h.Burst
		}
		h.defaultLimit = lim
		h.defaultPolicy = policyValue("default", lim)
	}
	if h.MaxFailures != "off" {
		spec := h.MaxFailures
		if spec == "" {
			spec = defaultMaxFailures
		}
		lim, err := ratelimit.ParseRate(spec)
		if err != nil {
			return fmt.Errorf("max_failures: %w", err)
		}
		h.guard = newFailGuard(lim, monoNow)
		go func() {
			t := time.NewTicker(limiterSweepInterval)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					h.guard.sweep()
				}
			}
		}()
	}
	if h.Quota != "" {
		q, err := quota.Parse(h.Quota)
		if err != nil {
			return err
		}
		h.defaultQuota = q
	}
	needQuotas := !h.defaultQuota.IsZero() && h.Limits != "redis"
	h.plans = make(map[string]*plan, len(h.Plans))
	for name, p := range h.Plans {
		cp, err := compilePlan(name, p)
		if err != nil {
			return err
		}
		h.plans[name] = cp
		needQuotas = needQuotas || (cp.quotaMode == limitOwn && h.Limits != "redis")
	}
	h.prefixes = h.prefixes[:0]
	for _, p := range h.Prefixes {
		if err := keyformat.ValidatePrefix(p); err != nil {
			return err
		}
		h.prefixes = append(h.prefixes, p)
	}
	if h.now == nil {
		h.now = func() int64 { return time.Now().UnixNano() }
	}

	if err := h.provisionRedis(repl); err != nil {
		return err
	}

	cc := CacheConfig{Size: defaultCacheSize, TTL: caddy.Duration(defaultCacheTTL), NegativeTTL: caddy.Duration(defaultNegativeTTL)}
	if h.Cache != nil {
		if h.Cache.Size != 0 {
			cc.Size = h.Cache.Size
		}
		if h.Cache.TTL != 0 {
			cc.TTL = h.Cache.TTL
		}
		if h.Cache.NegativeTTL != 0 {
			cc.NegativeTTL = h.Cache.NegativeTTL
		}
	}
	if cc.Size < 1 || cc.Size > maxCacheSize || cc.TTL < 0 || cc.NegativeTTL < 0 {
		return fmt.Errorf("cache: size must be from 1 to %d, ttl and negative_ttl positive", maxCacheSize)
	}
	if err := h.provisionCache(cc); err != nil {
		return fmt.Errorf("creating key cache: %w", err)
	}

	realm := h.Realm
	if realm == "" {
		realm = defaultRealm
	}
	scheme := "ApiKey"
	for _, s := range h.sources {
		if s.kind == sourceBearer {
			scheme = "Bearer"
			break
		}
	}
	h.challengeMiss = scheme + ` realm="` + realm + `"`
	h.challengeBad = h.challengeMiss
	if scheme == "Bearer" {
		// RFC 6750, section 3.1: a token that was sent but is not valid.
		h.challengeBad += `, error="invalid_token"`
	}

	val, _, err := limiterPool.LoadOrNew(limiterPoolKey, func() (caddy.Destructor, error) {
		l := newLimiter(nil)
		l.startSweeper(limiterSweepInterval)
		return l, nil
	})
	if err != nil {
		return err
	}
	h.limiter = val.(*limiter)
	h.limiterLoaded = true

	if h.KeysFile != "" {
		path := repl.ReplaceKnown(h.KeysFile, "")
		if path == "" {
			return fmt.Errorf("keys_file %q expands to an empty path", h.KeysFile)
		}
		abs, err := filepath.Abs(path)
		if err != nil {
			return fmt.Errorf("keys_file %s: %w", path, err)
		}
		poolKey := "api_key.keys_file:" + abs
		val, loaded, err := keysFilePool.LoadOrNew(poolKey, func() (caddy.Destructor, error) {
			return openKeysFile(abs, h.logger)
		})
		if err != nil {
			return err
		}
		h.keysFileKey = poolKey
		h.keysFile = val.(*keysFile)
		if err := h.keysFile.addCheck(h, h.checkPlans); err != nil {
			return err
		}
		if loaded {
			// The watcher logs to the newest config's logs.
			h.keysFile.logger.Store(h.logger)
			// A reload of the config is a good moment to look at the file.
			if err := h.keysFile.check(); err != nil {
				h.logger.Error("keys file not reloaded; the previous keys stay in use",
					zap.String("file", abs), zap.Error(err))
			}
		}
	}
	qpath, err := quotaPath(h.QuotaFile, repl)
	if err != nil {
		return err
	}
	h.quotas = &quotaRef{path: qpath, logger: h.logger}
	// Quotas of the config are known now: their store is opened now, so
	// that a store that cannot be used stops the config from loading. One
	// that only keys (in the keys file, or Redis) may need is opened by
	// the first request that does (quotaStore), so that a config without
	// quotas never takes the store's lock (caddy validate beside a running
	// Caddy would wait for it and fail).
	if needQuotas {
		if _, err := h.quotas.get(); err != nil {
			return err
		}
	}
	h.name = h.Name
	switch {
	case h.name != "":
	case h.keysFile != nil:
		h.name = h.keysFile.path
	case h.redisStore:
		h.name = "redis"
	default:
		h.name = "config"
	}
	addLive(h)
	return nil
}

// provisionRedis joins (or opens) the Redis backend, if one is configured.
func (h *Handler) provisionRedis(repl *caddy.Replacer) error {
	h.redisStore, h.redisLimits = h.Store == "redis", h.Limits == "redis"
	h.onStoreError, h.onLimiterError = h.OnStoreError, h.OnLimiterError
	if h.onStoreError == "" {
		h.onStoreError = storeErrorDeny
	}
	if h.onLimiterError == "" {
		h.onLimiterError = limiterErrorLocal
	}
	if h.Redis == nil {
		return nil
	}
	opts, schema, timeout, err := redisOptions(*h.Redis, repl)
	if err != nil {
		return err
	}
	// One backend per distinct connection; the password is in the pool
	// key only as a digest.
	id, _ := json.Marshal([]any{opts.Addrs, opts.MasterName, opts.Username, sha256.Sum256([]byte(opts.Password)), opts.DB, h.Redis.TLS, schema.prefix, timeout})
	key := "api_key.redis:" + string(id)
	val, loaded, err := redisPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newRedisBackend(opts, schema, timeout, h.logger), nil
	})
	if err != nil {
		return err
	}
	h.redisKey = key
	h.redis = val.(*redisBackend)
	if loaded {
		h.redis.logger.Store(h.logger)
	}
	return nil
}

// checkPlans reports a key in set whose plan this handler does not define.
func (h *Handler) checkPlans(set *keySet) error {
	var bad []string
	for _, rec := range set.all() {
		if rec.plan != "" && h.plans[rec.plan] == nil {
			bad = append(bad, fmt.Sprintf("key id %q: unknown plan %q", rec.id, rec.plan))
		}
	}
	if len(bad) == 0 {
		return nil
	}
	slices.Sort(bad)
	if len(bad) > 1 {
		return fmt.Errorf("%s (and %d more keys with unknown plans)", bad[0], len(bad)-1)
	}
	return errors.New(bad[0])
}

// quotaFlushInterval is how often quota counts are written to disk: at
// most this much counting is lost if the process is killed.
var quotaFlushInterval = time.Second

// quotaStore is a quota.Store shared through a caddy.UsagePool, so that
// counts outlive config reloads; it is flushed and closed when the last
// handler that uses it is cleaned up, as on shutdown.
type quotaStore struct{ *quota.Store }

func (s quotaStore) Destruct() error { return s.Close() }

// quotaPath returns the absolute path of the quota store: quotaFile with
// placeholders expanded, or the default in Caddy's data directory.
func quotaPath(quotaFile string, repl *caddy.Replacer) (string, error) {
	path := filepath.Join(caddy.AppDataDir(), "api_key", "quotas.db")
	if quotaFile != "" {
		path = repl.ReplaceKnown(quotaFile, "")
		if path == "" {
			return "", fmt.Errorf("quota_file %q expands to an empty path", quotaFile)
		}
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("quota_file %s: %w", path, err)
	}
	return abs, nil
}

var errHandlerClosed = errors.New("handler cleaned up")

// quotaRef is a handler's hold on the quota store, which it joins (or
// opens) on first use; a handler cleaned up opens nothing again.
type quotaRef struct {
	path   string
	logger *zap.Logger

	mu      sync.Mutex // guards joining and releasing
	store   atomic.Pointer[quota.Store]
	key     string // the usage-pool key once joined
	closed  bool
	failed  error     // the last failure to join, under mu
	failedT time.Time // when; get does not try again for quotaRetryAfter
	logged  atomic.Int64
}

// quotaRetryAfter is how long a failure to open the quota store is
// remembered, so that requests do not each wait for its lock.
const quotaRetryAfter = 10 * time.Second

// logFailure logs a failure to open the store at most once per
// quotaRetryAfter.
func (q *quotaRef) logFailure(err error) {
	now := time.Now().UnixNano()
	if last := q.logged.Load(); now-last > int64(quotaRetryAfter) && q.logged.CompareAndSwap(last, now) {
		q.logger.Error("quota store unavailable; requests with a quota are refused (429 limiter_unavailable)", zap.Error(err))
	}
}

// get returns the store, joining it if need be.
func (q *quotaRef) get() (*quota.Store, error) {
	if s := q.store.Load(); s != nil {
		return s, nil
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if s := q.store.Load(); s != nil {
		return s, nil
	}
	if q.closed {
		return nil, errHandlerClosed
	}
	if q.failed != nil && time.Since(q.failedT) < quotaRetryAfter {
		return nil, q.failed
	}
	key := "api_key.quota_store:" + q.path
	val, _, err := quotaPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		s, err := quota.Open(q.path, quotaFlushInterval, time.Now)
		if err != nil {
			return nil, err
		}
		return quotaStore{s}, nil
	})
	if err != nil {
		q.failed, q.failedT = err, time.Now()
		return nil, err
	}
	s := val.(quotaStore).Store
	s.OnFlush(flushLogger(q.logger, q.path))
	q.key = key
	q.store.Store(s)
	return s, nil
}

// release lets go of the store, if joined.
func (q *quotaRef) release() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	if q.key == "" {
		return nil
	}
	_, err := quotaPool.Delete(q.key)
	q.key = ""
	return err
}

// flushLogger logs failed background flushes of the quota store: each
// distinct error once, and the recovery.
func flushLogger(logger *zap.Logger, path string) func(error) {
	var last string // only the store's flusher goroutine calls it
	return func(err error) {
		if err == nil {
			if last != "" {
				logger.Info("quota counts written again", zap.String("file", path))
				last = ""
			}
			return
		}
		if msg := err.Error(); msg != last {
			last = msg
			logger.Error("quota counts not written; retrying every second", zap.String("file", path), zap.Error(err))
		}
	}
}

// inlineDigest returns the digest of an inline key, expanding placeholders
// and hashing a plaintext key. Its errors never quote the key.
func inlineDigest(repl *caddy.Replacer, k InlineKey) ([32]byte, error) {
	if isDigest(k.Key) {
		return parseDigest(k.Key)
	}
	if hasDigestPrefix(k.Key) {
		_, err := parseDigest(k.Key)
		return [32]byte{}, err
	}
	key := repl.ReplaceKnown(k.Key, "")
	if key == "" {
		if strings.Contains(k.Key, "{") {
			return [32]byte{}, fmt.Errorf("key %s is empty (is the variable set?)", k.Key)
		}
		return [32]byte{}, errors.New("key is empty")
	}
	// A placeholder may hold a hash as well as a key, as the Caddyfile's
	// {$VAR} may: the hash is not a key that works.
	if hasDigestPrefix(key) {
		return parseDigest(key)
	}
	if !validKey(key) {
		return [32]byte{}, fmt.Errorf("key must be 1 to %d visible ASCII characters", maxKeyLen)
	}
	return parseDigest(hashKey(key))
}

// warnLoggedSources warns, once per config load, about key sources that
// Caddy's access log records as sent.
func (h *Handler) warnLoggedSources() {
	for _, s := range h.sources {
		var field string
		switch s.kind {
		case sourceHeader:
			if s.name == "Authorization" || s.name == "Proxy-Authorization" {
				continue
			}
			field = "request>headers>" + s.name + " delete"
		case sourceQuery:
			field = "request>uri query, with delete " + s.name
		case sourceCookie:
			field = "request>headers>Cookie cookie, with delete " + s.name
		default:
			continue
		}
		h.logger.Warn("API keys sent this way appear in access logs unless a log filter removes them; see the README, Keeping keys out of logs",
			zap.String("source", s.String()), zap.String("log_filter_field", field))
	}
}

// warnIdleSettings warns about settings that do nothing in this
// configuration.
func (h *Handler) warnIdleSettings() {
	if h.Cache != nil && h.Cache.NegativeTTL != 0 && h.Store != "redis" {
		h.logger.Warn("cache negative_ttl has no effect without store redis: with the keys in memory, unknown keys are not cached")
	}
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	if h.KeysFile == "" && len(h.Keys) == 0 && h.Store != "redis" {
		return errors.New("no keys: set keys_file or key, or store redis")
	}
	switch h.Store {
	case "", "file":
	case "redis":
		if h.Redis == nil {
			return errors.New("store redis needs a redis block")
		}
		if h.KeysFile != "" {
			return errors.New("store redis and keys_file: keys are looked up in one store; import the file with caddy api-key import")
		}
	default:
		return fmt.Errorf("store %q: want file or redis", h.Store)
	}
	switch h.Limits {
	case "", "local":
	case "redis":
		if h.Redis == nil {
			return errors.New("limits redis needs a redis block")
		}
	default:
		return fmt.Errorf("limits %q: want local or redis", h.Limits)
	}
	switch h.Refusals {
	case "", refusalsAuto, refusalsErrors:
	default:
		return fmt.Errorf("refusals %q: want auto or errors", h.Refusals)
	}
	switch h.OnStoreError {
	case "", storeErrorDeny, storeErrorAllowCached:
	default:
		return fmt.Errorf("on_store_error %q: want deny or allow_cached", h.OnStoreError)
	}
	switch h.OnLimiterError {
	case "", limiterErrorLocal, limiterErrorAllow, limiterErrorDeny:
	default:
		return fmt.Errorf("on_limiter_error %q: want local, allow or deny", h.OnLimiterError)
	}
	if h.Burst != 0 {
		if h.Rate == "" {
			return errors.New("burst needs a rate")
		}
		if err := ratelimit.ValidateBurst(h.Burst); err != nil {
			return err
		}
	}
	return checkRealm(h.Realm)
}

// checkRealm accepts realms that need no escaping in a quoted string.
func checkRealm(realm string) error {
	if strings.ContainsAny(realm, "\"\\") || strings.ContainsFunc(realm, func(r rune) bool { return r < ' ' || r >= 0x7f }) {
		return fmt.Errorf("realm %q: use printable ASCII characters other than quotes and backslash", realm)
	}
	return nil
}

// provisionCache makes the handler's cache of key lookups. With keys in
// Redis the cache comes from cachePool, shared with the handler of the
// same configuration in the config before: on_store_error allow_cached
// admits only cached keys while Redis is down, and a config reload that
// started with an empty cache would refuse them all until Redis is back.
// Only a handler configured exactly alike shares it, since the cache
// holds this handler's own inline keys and the outcome of its plan
// checks too.
func (h *Handler) provisionCache(cc CacheConfig) error {
	newCache := func() (*keyCache, error) {
		return newKeyCache(cc.Size, time.Duration(cc.TTL), time.Duration(cc.NegativeTTL))
	}
	if !h.redisStore {
		var err error
		h.cache, err = newCache()
		return err
	}
	conf, err := json.Marshal(h)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(conf)
	key := "api_key.cache " + h.redisKey + " " + hex.EncodeToString(sum[:])
	val, _, err := cachePool.LoadOrNew(key, func() (caddy.Destructor, error) { return newCache() })
	if err != nil {
		return err
	}
	h.cache, h.cacheKey = val.(*keyCache), key
	return nil
}

// Cleanup releases the shared keys file and limiter, and the cache. It
// copes with a Provision that stopped half way.
func (h *Handler) Cleanup() error {
	removeLive(h)
	var errs []error
	switch {
	case h.cacheKey != "":
		if _, err := cachePool.Delete(h.cacheKey); err != nil {
			errs = append(errs, err)
		}
	case h.cache != nil:
		h.cache.close()
	}
	if h.keysFile != nil {
		h.keysFile.removeCheck(h)
	}
	if h.quotas != nil {
		if err := h.quotas.release(); err != nil {
			errs = append(errs, err)
		}
	}
	if h.redisKey != "" {
		if _, err := redisPool.Delete(h.redisKey); err != nil {
			errs = append(errs, err)
		}
	}
	if h.keysFileKey != "" {
		if _, err := keysFilePool.Delete(h.keysFileKey); err != nil {
			errs = append(errs, err)
		}
	}
	if h.limiterLoaded {
		if _, err := limiterPool.Delete(limiterPoolKey); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// The state that outlives config reloads.
var (
	limiterPool  = caddy.NewUsagePool()
	keysFilePool = caddy.NewUsagePool()
	quotaPool    = caddy.NewUsagePool()
	redisPool    = caddy.NewUsagePool()
	cachePool    = caddy.NewUsagePool()
)

func compileSource(s KeySource) (source, error) {
	switch s.Source {
	case "bearer":
		if s.Name != "" {
			return source{}, fmt.Errorf("from bearer takes no name, got %q", s.Name)
		}
		return source{kind: sourceBearer, name: "Authorization"}, nil
	case "header":
		if s.Name == "" || !validToken(s.Name) {
			return source{}, fmt.Errorf("from header: invalid header name %q", s.Name)
		}
		name := textproto.CanonicalMIMEHeaderKey(s.Name)
		if name == "Cookie" {
			return source{}, errors.New("from header: use from cookie <name> for a cookie")
		}
		return source{kind: sourceHeader, name: name}, nil
	case "query":
		if s.Name == "" {
			return source{}, errors.New("from query: missing parameter name")
		}
		return source{kind: sourceQuery, name: s.Name}, nil
	case "cookie":
		if s.Name == "" || !validToken(s.Name) {
			return source{}, fmt.Errorf("from cookie: invalid cookie name %q", s.Name)
		}
		return source{kind: sourceCookie, name: s.Name}, nil
	}
	return source{}, fmt.Errorf("unknown key source %q: want bearer, header, query or cookie", s.Source)
}

// validToken reports whether s is an RFC 9110 token, as header and cookie
// names must be.
func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// Interface guards
var (
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
