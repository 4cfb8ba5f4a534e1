package apikey

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/keystile/caddy-apikey/internal/keyformat"
	"github.com/keystile/caddy-apikey/internal/quota"
	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// Outcomes, as {http.api_key.outcome} and the access log's api_key>outcome
// show them.
const (
	outcomeOK            = "ok"
	outcomeMissing       = "missing"
	outcomeInvalid       = "invalid"
	outcomeDisabled      = "disabled"
	outcomeExpired       = "expired"
	outcomeNotYetValid   = "not_yet_valid"
	outcomeForbidden     = "forbidden"
	outcomeRateLimited   = "rate_limited"
	outcomeQuotaExceeded = "quota_exceeded"
)

// The errors of rejected requests. They say what went wrong, never with
// which key.
var (
	errMissing         = errors.New("api key missing")
	errInvalid         = errors.New("api key invalid")
	errDisabled        = errors.New("api key disabled")
	errExpired         = errors.New("api key expired")
	errNotYetValid     = errors.New("api key not yet valid")
	errForbidden       = errors.New("api key not allowed for this request")
	errRateLimited     = errors.New("api key over its rate limit")
	errQuotaExceeded   = errors.New("api key over its quota")
	errTooManyFailures = errors.New("too many failed api key attempts from this address")
)

// maxKeyLen is the longest key looked up; a longer value is invalid.
const maxKeyLen = 512

// maxSources is how many sources extract can tell apart (bits of found).
const maxSources = 64

// ServeHTTP checks the request's key and hands the request on when the key
// is known, valid now, allowed for this request and within its limits.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)

	// An address that has failed too often is refused before any work.
	if h.guard != nil && h.guard.len() != 0 {
		if addr, ok := clientAddr(r); ok {
			if blocked, retry := h.guard.blocked(addr); blocked {
				return h.tooManyFailures(w, r, repl, retry)
			}
		}
	}

	key, found, ok := h.extract(r)
	// The key leaves the request before anything else sees it, whatever
	// the outcome, so that handle_errors cannot show it either: every
	// source that carried a value, valid or not, also when two differ.
	// (Caddy puts the original URI back for handle_errors, so a key that
	// came in the query is there again.) key stays valid: strings are
	// immutable.
	if found != 0 && !h.PassKey {
		h.removeKey(r, found)
	}
	if !ok {
		return h.reject(w, r, repl, outcomeInvalid)
	}
	if found == 0 {
		return h.reject(w, r, repl, outcomeMissing)
	}
	// A key in this site's format with a wrong checksum was made up: no
	// lookup for it.
	if len(h.prefixes) != 0 && !h.checkFormat(key) {
		return h.reject(w, r, repl, outcomeInvalid)
	}
	digest := sha256.Sum256(unsafe.Slice(unsafe.StringData(key), len(key)))
	now := monoNow()
	rec, err := h.find(r, &digest, &now)
	if err != nil {
		return h.storeUnavailable(w, r, repl)
	}
	if rec == nil {
		return h.reject(w, r, repl, outcomeInvalid)
	}
	// With keys in Redis, a key found in the cache while Redis is down
	// may have been revoked since: on_store_error says whether to trust
	// it.
	var degraded string
	if h.redisStore && h.redis.down.Load() && h.inline[digest] == nil {
		if h.onStoreError != storeErrorAllowCached {
			return h.storeUnavailable(w, r, repl)
		}
		degraded = degradedCachedKey
	}
	if outcome, err := h.lifecycle(rec); err != nil {
		setChallenge(w.Header(), h.challengeBad)
		return h.refuse(w, r, repl, rec, outcome, "", http.StatusUnauthorized, err)
	}
	var pl *plan
	if rec.plan != "" {
		pl = h.plans[rec.plan]
	}
	// Most keys have no restrictions and no plan: no copy of none.
	if pl != nil || !rec.restr.isZero() {
		if restr := restrictionsOf(rec, pl); !restr.isZero() {
			if failed := restr.check(r, clientIP(r)); failed != "" {
				return h.refuse(w, r, repl, rec, outcomeForbidden, failed, http.StatusForbidden, errForbidden)
			}
		}
	}

	lim, pol := h.limitOf(rec, pl)
	if lim.IsZero() {
		pol = nil
	}
	q := h.quotaOf(rec, pl)
	if lim.IsZero() && q.IsZero() {
		return h.admit(w, r, next, repl, rec, degraded, now, nil)
	}
	if h.redisLimits {
		d, err := h.redisDecide(r, rec, lim, q)
		if err == nil {
			return h.answer(w, r, next, repl, rec, pol, d, q, degraded, now)
		}
		switch h.onLimiterError {
		case limiterErrorAllow:
			return h.admit(w, r, next, repl, rec, degradedUnlimited, now, nil)
		case limiterErrorDeny:
			w.Header().Set("Retry-After", "1")
			return h.refuse(w, r, repl, rec, outcomeLimiterUnavailable, "", http.StatusTooManyRequests, errLimiterUnavailable)
		}
		degraded = degradedLocalLimits
		now = monoNow() // Redis may have taken its whole timeout
		// Quotas are Redis's alone: this server's own store may be in
		// use by another process, and a quota counted here would not be
		// Redis's anyway. While Redis is down only the rate is counted.
		q = quota.Quota{}
	}
	var d limitDecision
	var quotas *quota.Store
	if !q.IsZero() {
		var err error
		if quotas, err = h.quotas.get(); err != nil {
			h.quotas.logFailure(err)
			w.Header().Set("Retry-After", "1")
			return h.refuse(w, r, repl, rec, outcomeLimiterUnavailable, "", http.StatusTooManyRequests, errLimiterUnavailable)
		}
		// Over quota already: refuse without spending a rate token.
		if d.quota = quotas.Peek(quotaName(rec), q); !d.quota.Allowed {
			d.over = outcomeQuotaExceeded
			return h.answer(w, r, next, repl, rec, pol, d, q, degraded, now)
		}
	}
	if !lim.IsZero() {
		if d.rate = h.limiter.decide(&usageOf(rec).limit, &rec.digest, lim, now); !d.rate.Allowed {
			d.over = outcomeRateLimited
			return h.answer(w, r, next, repl, rec, pol, d, q, degraded, now)
		}
	}
	if !q.IsZero() {
		// Only admitted requests count; a request that lost the last
		// call of the period to another between Peek and Take is over.
		if d.quota = quotas.Take(quotaName(rec), q); !d.quota.Allowed {
			d.over = outcomeQuotaExceeded
		}
	}
	return h.answer(w, r, next, repl, rec, pol, d, q, degraded, now)
}

// Values of the log field's degraded: why a request was admitted in a
// way it would not be with Redis up.
const (
	degradedCachedKey   = "cached_key"   // Redis down, key from the cache (allow_cached)
	degradedLocalLimits = "local_limits" // Redis down, this server's counters (local)
	degradedUnlimited   = "unlimited"    // Redis down, no counting (allow)
)

// answer sends the response of a decision on a key's limits: 429 when
// it is over one, else on to next, with the rate headers either way. now
// is the request's monoNow reading.
func (h *Handler) answer(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, repl *caddy.Replacer, rec *keyRecord, pol *policy, d limitDecision, q quota.Quota, degraded string, now int64) error {
	switch d.over {
	case outcomeQuotaExceeded:
		countDecision(limitQuota, false, d.inRedis)
	case outcomeRateLimited:
		countDecision(limitRate, false, d.inRedis)
	default:
		if pol != nil {
			countDecision(limitRate, true, d.inRedis)
		}
		if !q.IsZero() {
			countDecision(limitQuota, true, d.inRedis)
		}
	}
	switch d.over {
	case outcomeQuotaExceeded:
		setRateHeaders(w.Header(), nil, ratelimit.Decision{}, q, d.quota)
		w.Header().Set("Retry-After", strconv.FormatInt(max(1, ratelimit.CeilSeconds(d.quota.Reset)), 10))
		return h.refuse(w, r, repl, rec, outcomeQuotaExceeded, degraded, http.StatusTooManyRequests, errQuotaExceeded)
	case outcomeRateLimited:
		setRateHeaders(w.Header(), pol, d.rate, q, d.quota)
		w.Header().Set("Retry-After", strconv.FormatInt(max(1, ratelimit.CeilSeconds(d.rate.RetryAfter)), 10))
		return h.refuse(w, r, repl, rec, outcomeRateLimited, degraded, http.StatusTooManyRequests, errRateLimited)
	}
	spare := setRateHeaders(w.Header(), pol, d.rate, q, d.quota)
	return h.admit(w, r, next, repl, rec, degraded, now, spare)
}

// admit names the key and hands the request on. now is the request's
// monoNow reading; spare, if not nil, is room for the log field.
func (h *Handler) admit(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, repl *caddy.Replacer, rec *keyRecord, degraded string, now int64, spare *[1]zapcore.Field) error {
	h.countOutcomeAt(outcomeOK, rec, now)
	if degraded == "" {
		h.setIdentity(r, repl, rec, (*logOK)(rec), spare)
	} else {
		h.setIdentity(r, repl, rec, &logRefused{rec: rec, outcome: outcomeOK, degraded: degraded}, spare)
	}
	return next.ServeHTTP(w, r)
}

// redisDecide decides a request in Redis, or from the memory of a recent
// denial (the local pre-check), which spares Redis a round trip for a key
// that is clearly over.
func (h *Handler) redisDecide(r *http.Request, rec *keyRecord, lim ratelimit.Limit, q quota.Quota) (limitDecision, error) {
	now := time.Now().UnixNano()
	id := deniedID{digest: rec.digest, lim: lim, quota: q}
	gen := h.redis.gen.Load()
	if dk, ok := h.redis.denied.get(&id, now, gen); ok {
		// The remembered answer, aged by the time since.
		d, elapsed := dk.d, time.Duration(now-dk.at)
		d.rate.RetryAfter = max(0, d.rate.RetryAfter-elapsed)
		d.rate.Reset = max(0, d.rate.Reset-elapsed)
		d.quota.Reset = max(0, d.quota.Reset-elapsed)
		return d, nil
	}
	d, err := h.redis.decide(r.Context(), &rec.digest, lim, q)
	if err != nil {
		return d, err
	}
	switch d.over {
	case outcomeRateLimited:
		h.redis.denied.put(&id, deniedKey{at: now, until: now + int64(d.rate.RetryAfter), gen: gen, d: d})
	case outcomeQuotaExceeded:
		h.redis.denied.put(&id, deniedKey{at: now, until: now + int64(d.quota.Reset), gen: gen, d: d})
	}
	return d, nil
}

// storeUnavailable answers a request whose key could not be looked up
// because Redis is down (on_store_error deny, or a key not in the cache):
// 401 without the invalid_token error, since the key may well be good,
// and Retry-After: 1. It is never a 5xx.
func (h *Handler) storeUnavailable(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer) error {
	h.countOutcome(outcomeStoreUnavailable, nil)
	if repl != nil {
		repl.Map(providerStoreUnavailable)
	}
	if extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok {
		setLogField(extra, zap.Object("api_key", logStoreUnavailable))
	}
	setChallenge(w.Header(), h.challengeMiss)
	w.Header().Set("Retry-After", "1")
	return h.fail(w, r, http.StatusUnauthorized, errStoreUnavailable)
}

// refuse answers a request made with a known key that may not pass: the
// placeholders and the log field name the key and the outcome (and the
// restriction that failed, if one did).
//
// detail is the restriction that failed, for forbidden; for the other
// outcomes it is the degraded mode the request was decided in, if any.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer, rec *keyRecord, outcome, detail string, status int, err error) error {
	h.countOutcome(outcome, rec)
	lf := &logRefused{rec: rec, outcome: outcome}
	restriction := ""
	if outcome == outcomeForbidden {
		lf.restriction, restriction = detail, detail
	} else {
		lf.degraded = detail
	}
	h.setIdentity(r, repl, rec, lf, nil)
	// The key's provider answers "ok"; a static value is looked up before
	// any provider, so these rarer outcomes cost a map entry instead of a
	// second provider per key.
	if repl != nil {
		repl.Set("http.api_key.outcome", outcome)
		if restriction != "" {
			repl.Set("http.api_key.restriction", restriction)
		}
	}
	return h.fail(w, r, status, err)
}

// checkFormat reports whether key is well formed for every declared prefix
// it carries: false for a key that carries one and fails its checksum.
func (h *Handler) checkFormat(key string) bool {
	carried := false
	for _, p := range h.prefixes {
		if keyformat.HasPrefix(key, p) {
			if keyformat.Check(key, p) {
				return true
			}
			carried = true
		}
	}
	return !carried
}

// lifecycle returns the outcome and error of a key that is disabled, not
// yet valid or expired; a nil error when it is valid now.
func (h *Handler) lifecycle(rec *keyRecord) (string, error) {
	if rec.disabled {
		return outcomeDisabled, errDisabled
	}
	if rec.notBefore == 0 && rec.expires == 0 {
		return "", nil
	}
	now := h.now()
	if rec.notBefore != 0 && now < rec.notBefore {
		return outcomeNotYetValid, errNotYetValid
	}
	if rec.expires != 0 && now >= rec.expires {
		return outcomeExpired, errExpired
	}
	return "", nil
}

// restrictionsOf returns the restrictions that apply to rec: its own, and
// its plan's where it sets none of a kind.
func restrictionsOf(rec *keyRecord, pl *plan) restrictions {
	if pl == nil {
		return rec.restr
	}
	return pl.restr.over(&rec.restr)
}

// clientAddr is clientIP parsed, unmapped.
func clientAddr(r *http.Request) (netip.Addr, bool) {
	a, err := netip.ParseAddr(clientIP(r))
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

// tooManyFailures answers a request from an address that has made too
// many failed key attempts: 429 until its failures run out.
func (h *Handler) tooManyFailures(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer, retry time.Duration) error {
	h.countOutcome(outcomeTooManyFailures, nil)
	if repl != nil {
		repl.Map(providerTooManyFailures)
	}
	if extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok {
		setLogField(extra, zap.Object("api_key", logTooManyFailures))
	}
	w.Header().Set("Retry-After", strconv.FormatInt(max(1, ratelimit.CeilSeconds(retry)), 10))
	return h.fail(w, r, http.StatusTooManyRequests, errTooManyFailures)
}

// fail ends a refused request, whose headers are set. On a server with
// error routes (handle_errors) it returns the error, for them to shape
// the response. On a server without, where nothing would shape it, it
// writes the status itself, as Caddy's server would, and returns nil:
// Caddy's error path would otherwise encode the whole request into each
// of the process's log outputs for its error log (a debug-level line for a
// 4xx, so seldom written), which cost a flood of made-up keys more than
// twice what a valid request costs in a process with ten log outputs.
// Outside a Caddy server (no server in the context), and with refusals
// errors, it always returns the error.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, status int, err error) error {
	if h.Refusals == refusalsErrors {
		return handlerError(status, err)
	}
	if srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv != nil &&
		(srv.Errors == nil || len(srv.Errors.Routes) == 0) {
		w.WriteHeader(status)
		return nil
	}
	return handlerError(status, err)
}

// handlerError is caddyhttp.Error(status, err) with a fixed trace. Caddy
// makes the trace by walking the stack (runtime.Caller, FuncForPC and
// Sprintf), which costs more than the whole key check: a flood of made-up
// keys would pay it on every request. The trace would name this handler
// anyway.
func handlerError(status int, err error) error {
	return caddyhttp.Error(status, caddyhttp.HandlerError{StatusCode: status, Err: err, Trace: handlerTrace})
}

const handlerTrace = "caddy-apikey.(*Handler).ServeHTTP (handler.go)"

// setChallenge sets WWW-Authenticate. Header.Set would make the canonical
// form of the name ("Www-Authenticate") anew on every call.
func setChallenge(hdr http.Header, challenge string) {
	hdr["Www-Authenticate"] = []string{challenge}
}

// clientIP returns Caddy's client address of r (trusted_proxies applied).
func clientIP(r *http.Request) string {
	ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	return ip
}

// quotaName is the name of a key's quota counters: its digest, so that a
// key accepted by several sites counts once, as with rate limits.
func quotaName(rec *keyRecord) string {
	return unsafe.String(&rec.digest[0], len(rec.digest))
}

// find returns the record of the key with this digest, or nil. It asks the
// cache first and remembers a key found, and a key Redis did not find; an
// error is a lookup in Redis that failed, which is not remembered. *now is the
// request's monoNow reading; a lookup in Redis reads the clock again.
func (h *Handler) find(r *http.Request, digest *[32]byte, now *int64) (*keyRecord, error) {
	var set *keySet
	var gen uint64
	switch {
	case h.keysFile != nil:
		set = h.keysFile.set.Load()
		gen = set.gen
	case h.redisStore:
		gen = h.redis.gen.Load()
	}
	if rec, ok := h.cache.get(digest, gen, *now); ok {
		apiKeyMetrics.cacheHits.Inc()
		return rec, nil
	}
	apiKeyMetrics.cacheMisses.Inc()
	rec := h.inline[*digest]
	if rec == nil && set != nil {
		// A key on a plan this site does not define is refused here;
		// loading the file logged it.
		if rec = set.get(digest); rec != nil && rec.plan != "" && h.plans[rec.plan] == nil {
			rec = nil
		}
	}
	if rec == nil && h.redisStore {
		var err error
		rec, err = h.redis.lookup(r.Context(), digest)
		// The lookup may have taken up to Redis's timeout: the limits
		// and the cache go by the time after it.
		*now = monoNow()
		if err != nil {
			var bad badRecordError
			if !errors.As(err, &bad) {
				return nil, err
			}
			// A record that does not check out: logged, and the key
			// treated as unknown.
			h.logger.Error("key in redis refused", zap.Error(err))
			rec = nil
		}
		if rec != nil && rec.plan != "" && h.plans[rec.plan] == nil {
			h.logger.Error("key in redis refused: unknown plan", zap.String("id", rec.id), zap.String("plan", rec.plan))
			rec = nil
		}
	}
	// An unknown key is remembered only when its lookup went to Redis:
	// the key set and the inline keys are in memory, where a miss costs
	// less than the ristretto Set that would remember it (and a flood of
	// made-up keys would crowd out the found ones).
	if rec != nil || h.redisStore {
		h.cache.put(digest, gen, rec, *now)
	}
	return rec, nil
}

// limitOf returns the rate limit that applies to rec and its
// RateLimit-Policy value; a zero limit when none applies. The key's own
// setting comes first, then its plan's, then the handler's.
func (h *Handler) limitOf(rec *keyRecord, pl *plan) (ratelimit.Limit, *policy) {
	switch rec.limitMode {
	case limitOwn:
		return rec.limit, &rec.policy
	case limitOff:
		return ratelimit.Limit{}, nil
	}
	lim, pol := h.defaultLimit, &h.defaultPolicy
	if pl != nil {
		switch pl.limitMode {
		case limitOwn:
			lim, pol = pl.limit, &pl.policy
		case limitOff:
			return ratelimit.Limit{}, nil
		}
	}
	if rec.burst != 0 && !lim.IsZero() {
		lim.Burst = rec.burst
	}
	return lim, pol
}

// quotaOf returns the quota that applies to rec, in the same order as
// limitOf; a zero quota when none applies.
func (h *Handler) quotaOf(rec *keyRecord, pl *plan) quota.Quota {
	switch rec.quotaMode {
	case limitOwn:
		return rec.quota
	case limitOff:
		return quota.Quota{}
	}
	if pl != nil {
		switch pl.quotaMode {
		case limitOwn:
			return pl.quota
		case limitOff:
			return quota.Quota{}
		}
	}
	return h.defaultQuota
}

// rateHeaders holds the RateLimit and RateLimit-Policy header values of one
// response in a single allocation: the slices and the bytes of the
// values, sized for a rate limit alone, and room for the access log's
// api_key field (see setLogFieldIn), so that an admitted request with a
// limit allocates once. The values are not shared between responses, since
// later handlers may edit header slices in place.
type rateHeaders struct {
	rateLimit [1]string
	policy    [1]string
	logField  [1]zapcore.Field
	buf       [48]byte // "default";r=<10 digits>;t=<10 digits>
}

// rateQuotaHeaders is rateHeaders with room for a quota policy too.
type rateQuotaHeaders struct {
	rateLimit [1]string
	policy    [1]string
	logField  [1]zapcore.Field
	buf       [176]byte
}

// setRateHeaders sets RateLimit-Policy and RateLimit, as in
// draft-ietf-httpapi-ratelimit-headers-10, for the rate limit (pol, d;
// none when pol is nil) and the quota (q, qd; none when q is zero): r is
// the number of requests left now, t the seconds until the full burst is
// back, or until the quota's period ends. It returns the room it made for
// the log field, nil if it set nothing.
func setRateHeaders(hdr http.Header, pol *policy, d ratelimit.Decision, q quota.Quota, qd quota.Decision) *[1]zapcore.Field {
	if pol == nil && q.IsZero() {
		return nil
	}
	var rateLimit, policy []string
	var spare *[1]zapcore.Field
	var b []byte
	if q.IsZero() {
		rh := new(rateHeaders)
		rateLimit, policy, spare, b = rh.rateLimit[:], rh.policy[:], &rh.logField, rh.buf[:0]
	} else {
		rh := new(rateQuotaHeaders)
		rateLimit, policy, spare, b = rh.rateLimit[:], rh.policy[:], &rh.logField, rh.buf[:0]
	}
	if pol != nil {
		b = append(b, pol.rateLabel...)
		b = append(b, ";r="...)
		b = strconv.AppendInt(b, d.Remaining, 10)
		b = append(b, ";t="...)
		b = strconv.AppendInt(b, ratelimit.CeilSeconds(d.Reset), 10)
	}
	if !q.IsZero() {
		if pol != nil {
			b = append(b, ", "...)
		}
		b = append(b, `"quota";r=`...)
		b = strconv.AppendInt(b, qd.Remaining, 10)
		b = append(b, ";t="...)
		b = strconv.AppendInt(b, ratelimit.CeilSeconds(qd.Reset), 10)
	}
	// The bytes are never written again, so they can back strings.
	rateLimit[0] = unsafe.String(unsafe.SliceData(b), len(b))
	if q.IsZero() {
		policy[0] = pol.header
	} else {
		start := len(b)
		if pol != nil {
			b = append(b, pol.header...)
			b = append(b, ", "...)
		}
		b = append(b, `"quota";q=`...)
		b = strconv.AppendInt(b, q.Count, 10)
		b = append(b, ";w="...)
		b = strconv.AppendInt(b, ratelimit.CeilSeconds(qd.Window), 10)
		policy[0] = unsafe.String(&b[start], len(b)-start)
	}
	hdr["Ratelimit-Policy"] = policy
	hdr["Ratelimit"] = rateLimit
	return spare
}

// setIdentity names the key for the placeholders, the vars and the access
// log. All of it is made once per key at load, so nothing allocates but
// the growth of the log fields' slice, and not that when spare is room
// for the field.
func (h *Handler) setIdentity(r *http.Request, repl *caddy.Replacer, rec *keyRecord, logObj zapcore.ObjectMarshaler, spare *[1]zapcore.Field) {
	if repl != nil {
		repl.Map(rec.provider)
	}
	caddyhttp.SetVar(r.Context(), "http.auth.user.id", rec.idAny)
	if extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok {
		setLogFieldIn(extra, zap.Object("api_key", logObj), spare)
	}
}

// reject answers a request without a usable key: 401 with a challenge.
func (h *Handler) reject(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer, outcome string) error {
	h.countOutcome(outcome, nil)
	if outcome == outcomeInvalid && h.guard != nil {
		if addr, ok := clientAddr(r); ok {
			h.guard.fail(addr)
		}
	}
	challenge, obj, provider, err := h.challengeMiss, logMissing, providerMissing, errMissing
	if outcome == outcomeInvalid {
		challenge, obj, provider, err = h.challengeBad, logInvalid, providerInvalid, errInvalid
	}
	if repl != nil {
		repl.Map(provider)
	}
	if extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok {
		setLogField(extra, zap.Object("api_key", obj))
	}
	setChallenge(w.Header(), challenge)
	return h.fail(w, r, http.StatusUnauthorized, err)
}

// The access log's api_key field, per outcome. logOK is a conversion of
// keyRecord, so the field of an admitted request needs no allocation.
type (
	logOK      keyRecord
	logOutcome string
	logRefused struct {
		rec         *keyRecord
		outcome     string
		restriction string
		degraded    string
	}
)

func (l *logOK) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("id", l.id)
	if l.plan != "" {
		enc.AddString("plan", l.plan)
	}
	enc.AddString("outcome", outcomeOK)
	return nil
}

func (l *logRefused) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("id", l.rec.id)
	if l.rec.plan != "" {
		enc.AddString("plan", l.rec.plan)
	}
	enc.AddString("outcome", l.outcome)
	if l.restriction != "" {
		enc.AddString("restriction", l.restriction)
	}
	if l.degraded != "" {
		enc.AddString("degraded", l.degraded)
	}
	return nil
}

func (l *logOutcome) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("outcome", string(*l))
	return nil
}

var (
	logMissing = func() *logOutcome { o := logOutcome(outcomeMissing); return &o }()
	logInvalid = func() *logOutcome { o := logOutcome(outcomeInvalid); return &o }()

	logStoreUnavailable = func() *logOutcome { o := logOutcome(outcomeStoreUnavailable); return &o }()
	logTooManyFailures  = func() *logOutcome { o := logOutcome(outcomeTooManyFailures); return &o }()

	providerMissing          = outcomeProvider(outcomeMissing)
	providerInvalid          = outcomeProvider(outcomeInvalid)
	providerStoreUnavailable = outcomeProvider(outcomeStoreUnavailable)
	providerTooManyFailures  = outcomeProvider(outcomeTooManyFailures)
)

// outcomeProvider answers {http.api_key.outcome} for a request with no
// known key; the other http.api_key placeholders are empty then.
func outcomeProvider(outcome string) caddy.ReplacerFunc {
	var boxed any = outcome
	return func(key string) (any, bool) {
		if key == "http.api_key.outcome" {
			return boxed, true
		}
		if strings.HasPrefix(key, "http.api_key.") {
			return "", true
		}
		return nil, false
	}
}

// sourceKind is where a key may be found.
type sourceKind uint8

const (
	sourceBearer sourceKind = iota
	sourceHeader
	sourceQuery
	sourceCookie
)

// source is a compiled KeySource. Header names are canonical, so that a
// lookup neither allocates nor misses.
type source struct {
	kind sourceKind
	name string
}

func (s source) String() string {
	switch s.kind {
	case sourceBearer:
		return "bearer"
	case sourceHeader:
		return "header " + s.name
	case sourceQuery:
		return "query " + s.name
	}
	return "cookie " + s.name
}

// extract finds the request's key. found has bit i set when source i
// carried a value, a key or not. ok is false when a value is malformed
// (too long, not visible ASCII, empty, badly escaped) or when two sources
// or two values disagree: such a request is rejected without a lookup,
// and key is empty. Every source is read either way, so that found names
// all that removeKey must take out.
func (h *Handler) extract(r *http.Request) (key string, found uint64, ok bool) {
	var c collector
	for i, s := range h.sources {
		c.bit = 1 << i
		switch s.kind {
		case sourceBearer:
			for _, v := range r.Header["Authorization"] {
				if tok, isBearer := bearerToken(v); isBearer {
					c.add(tok)
				}
			}
		case sourceHeader:
			for _, v := range r.Header[s.name] {
				c.add(v)
			}
		case sourceQuery:
			scanQuery(r.URL.RawQuery, s.name, &c)
		case sourceCookie:
			for _, v := range r.Header["Cookie"] {
				scanCookies(v, s.name, &c)
			}
		}
	}
	if c.bad {
		return "", c.found, false
	}
	return c.key, c.found, true
}

// collector gathers the values extract finds, and fails on the first that
// cannot be a key or differs from one found before; it goes on noting
// which sources carried a value.
type collector struct {
	key   string
	found uint64
	bit   uint64
	bad   bool
}

func (c *collector) add(v string) {
	c.found |= c.bit
	if c.bad {
		return
	}
	// A key found before is never empty: validKey refuses "".
	if !validKey(v) || (c.key != "" && v != c.key) {
		c.bad = true
		return
	}
	c.key = v
}

// fail notes a value of the current source that cannot be read at all.
func (c *collector) fail() {
	c.found |= c.bit
	c.bad = true
}

// validKey reports whether v can be a key: 1 to maxKeyLen visible ASCII
// characters (0x21 to 0x7e). It tests eight bytes at a time: a 64-byte key
// takes 8 steps instead of 64.
func validKey(v string) bool {
	if len(v) == 0 || len(v) > maxKeyLen {
		return false
	}
	i := 0
	for ; i+8 <= len(v); i += 8 {
		if !visible8(binary.LittleEndian.Uint64(unsafe.Slice(unsafe.StringData(v[i:]), 8))) {
			return false
		}
	}
	for ; i < len(v); i++ {
		if v[i] <= ' ' || v[i] >= 0x7f {
			return false
		}
	}
	return true
}

// visible8 reports whether each of the eight bytes of x is visible ASCII
// (0x21 to 0x7e). These are the "has less" and "has more" tests of Sean
// Anderson's Bit Twiddling Hacks, exact as a whole for n <= 128: a byte
// below 0x21 borrows into its own high bit, one above 0x7e carries into
// it (or has it set already).
func visible8(x uint64) bool {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	below := (x - ones*0x21) &^ x & highs
	above := (x + ones*(127-0x7e) | x) & highs
	return below|above == 0
}

// bearerToken returns the token of an Authorization value of the Bearer
// scheme (RFC 6750: the scheme is case-insensitive, then one or more
// spaces). isBearer is false for other schemes, which are not keys.
func bearerToken(v string) (tok string, isBearer bool) {
	const scheme = "Bearer"
	if len(v) < len(scheme) || !strings.EqualFold(v[:len(scheme)], scheme) {
		return "", false
	}
	rest := v[len(scheme):]
	if rest != "" && rest[0] != ' ' {
		return "", false // another scheme, such as "Bearerx"
	}
	return strings.Trim(rest, " "), true
}

// scanQuery adds the values of the query parameter name. A value that is
// not valid percent-encoding is malformed.
func scanQuery(rawQuery, name string, c *collector) {
	for rawQuery != "" {
		var part string
		part, rawQuery, _ = strings.Cut(rawQuery, "&")
		k, v, _ := strings.Cut(part, "=")
		if k != name {
			if !strings.ContainsAny(k, "%+") {
				continue
			}
			uk, err := url.QueryUnescape(k)
			if err != nil || uk != name {
				continue
			}
		}
		uv, err := url.QueryUnescape(v)
		if err != nil {
			c.fail()
			continue
		}
		c.add(uv)
	}
}

// scanCookies adds the values of the cookie name in one Cookie header.
func scanCookies(line, name string, c *collector) {
	for line != "" {
		var part string
		part, line, _ = strings.Cut(line, ";")
		k, v, _ := strings.Cut(part, "=")
		if strings.TrimSpace(k) != name {
			continue
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = v[1 : len(v)-1]
		}
		c.add(v)
	}
}

// removeKey takes the key out of the request before it is handed on, from
// every source that carried it.
func (h *Handler) removeKey(r *http.Request, found uint64) {
	for i, s := range h.sources {
		if found&(1<<i) == 0 {
			continue
		}
		switch s.kind {
		case sourceBearer:
			vals := r.Header["Authorization"]
			kept := vals[:0:0]
			for _, v := range vals {
				if _, isBearer := bearerToken(v); !isBearer {
					kept = append(kept, v)
				}
			}
			if len(kept) == 0 {
				delete(r.Header, "Authorization")
			} else {
				r.Header["Authorization"] = kept
			}
		case sourceHeader:
			delete(r.Header, s.name)
		case sourceQuery:
			r.URL.RawQuery = withoutQueryParam(r.URL.RawQuery, s.name)
			r.RequestURI = r.URL.RequestURI()
		case sourceCookie:
			var kept []string
			for _, line := range r.Header["Cookie"] {
				if l := withoutCookie(line, s.name); l != "" {
					kept = append(kept, l)
				}
			}
			if len(kept) == 0 {
				delete(r.Header, "Cookie")
			} else {
				r.Header["Cookie"] = kept
			}
		}
	}
}

// withoutQueryParam returns rawQuery without the parameter name.
func withoutQueryParam(rawQuery, name string) string {
	var b strings.Builder
	for rawQuery != "" {
		var part string
		part, rawQuery, _ = strings.Cut(rawQuery, "&")
		k, _, _ := strings.Cut(part, "=")
		if uk, err := url.QueryUnescape(k); k == name || (err == nil && uk == name) {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('&')
		}
		b.WriteString(part)
	}
	return b.String()
}

// withoutCookie returns a Cookie header line without the cookie name.
func withoutCookie(line, name string) string {
	var b strings.Builder
	for line != "" {
		var part string
		part, line, _ = strings.Cut(line, ";")
		part = strings.TrimSpace(part)
		if k, _, _ := strings.Cut(part, "="); strings.TrimSpace(k) == name || part == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteString("; ")
		}
		b.WriteString(part)
	}
	return b.String()
}
