package apikey

import (
	"crypto/sha256"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// Outcomes, as {http.api_key.outcome} and the access log's api_key>outcome
// show them.
const (
	outcomeOK          = "ok"
	outcomeMissing     = "missing"
	outcomeInvalid     = "invalid"
	outcomeRateLimited = "rate_limited"
)

// The errors of rejected requests. They say what went wrong, never with
// which key.
var (
	errMissing     = errors.New("api key missing")
	errInvalid     = errors.New("api key invalid")
	errRateLimited = errors.New("api key over its rate limit")
)

// maxKeyLen is the longest key looked up; a longer value is invalid.
const maxKeyLen = 512

// maxSources is how many sources extract can tell apart (bits of found).
const maxSources = 64

// ServeHTTP checks the request's key and hands the request on when the key
// is known and within its rate limit.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)

	key, found, ok := h.extract(r)
	if !ok {
		return h.reject(w, r, repl, outcomeInvalid)
	}
	if found == 0 {
		return h.reject(w, r, repl, outcomeMissing)
	}
	digest := sha256.Sum256(unsafe.Slice(unsafe.StringData(key), len(key)))
	rec := h.find(&digest)
	if rec == nil {
		return h.reject(w, r, repl, outcomeInvalid)
	}

	// The key leaves the request before anything else sees it. (Caddy
	// puts the original URI back for handle_errors, so a key that came in
	// the query is there again.)
	if !h.PassKey {
		h.removeKey(r, found)
	}
	if lim, pol := h.limitOf(rec); !lim.IsZero() {
		d := h.limiter.decide(&rec.digest, lim)
		setRateHeaders(w.Header(), pol, d)
		if !d.Allowed {
			h.setIdentity(r, repl, rec, (*logRateLimited)(rec))
			// The key's provider answers "ok"; a static value is looked
			// up before any provider, so this one rare outcome costs a
			// map entry instead of a second provider per key.
			if repl != nil {
				repl.Set("http.api_key.outcome", outcomeRateLimited)
			}
			w.Header().Set("Retry-After", strconv.FormatInt(max(1, ratelimit.CeilSeconds(d.RetryAfter)), 10))
			return caddyhttp.Error(http.StatusTooManyRequests, errRateLimited)
		}
	}

	h.setIdentity(r, repl, rec, (*logOK)(rec))
	return next.ServeHTTP(w, r)
}

// find returns the record of the key with this digest, or nil. It asks the
// cache first and remembers what the key set answered.
func (h *Handler) find(digest *[32]byte) *keyRecord {
	var set *keySet
	var gen uint64
	if h.keysFile != nil {
		set = h.keysFile.set.Load()
		gen = set.gen
	}
	if rec, ok := h.cache.get(digest, gen); ok {
		return rec
	}
	rec := h.inline[*digest]
	if rec == nil && set != nil {
		rec = set.byDigest[*digest]
	}
	h.cache.put(digest, gen, rec)
	return rec
}

// limitOf returns the rate limit that applies to rec and its
// RateLimit-Policy value; a zero limit when none applies.
func (h *Handler) limitOf(rec *keyRecord) (ratelimit.Limit, *policy) {
	switch rec.limitMode {
	case limitOwn:
		return rec.limit, &rec.policy
	case limitOff:
		return ratelimit.Limit{}, nil
	}
	lim := h.defaultLimit
	if rec.burst != 0 && !lim.IsZero() {
		lim.Burst = rec.burst
	}
	return lim, &h.defaultPolicy
}

// rateHeaders holds the RateLimit and RateLimit-Policy header values of one
// response in a single allocation: the slices and the bytes of the
// RateLimit value. The values are not shared between responses, since
// later handlers may edit header slices in place.
type rateHeaders struct {
	rateLimit [1]string
	policy    [1]string
	buf       [64]byte
}

// setRateHeaders sets RateLimit-Policy and RateLimit, as in
// draft-ietf-httpapi-ratelimit-headers-10: r is the number of requests
// left now, t the seconds until the full burst is back.
func setRateHeaders(hdr http.Header, pol *policy, d ratelimit.Decision) {
	rh := new(rateHeaders)
	b := append(rh.buf[:0], pol.rateLabel...)
	b = append(b, ";r="...)
	b = strconv.AppendInt(b, d.Remaining, 10)
	b = append(b, ";t="...)
	b = strconv.AppendInt(b, ratelimit.CeilSeconds(d.Reset), 10)
	// The bytes are never written again, so they can back a string.
	rh.rateLimit[0] = unsafe.String(unsafe.SliceData(b), len(b))
	rh.policy[0] = pol.header
	hdr["Ratelimit-Policy"] = rh.policy[:]
	hdr["Ratelimit"] = rh.rateLimit[:]
}

// setIdentity names the key for the placeholders, the vars and the access
// log. All of it is made once per key at load, so nothing allocates but
// the growth of the log fields' slice.
func (h *Handler) setIdentity(r *http.Request, repl *caddy.Replacer, rec *keyRecord, logObj zapcore.ObjectMarshaler) {
	if repl != nil {
		repl.Map(rec.provider)
	}
	caddyhttp.SetVar(r.Context(), "http.auth.user.id", rec.idAny)
	if extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok {
		setLogField(extra, zap.Object("api_key", logObj))
	}
}

// reject answers a request without a usable key: 401 with a challenge.
func (h *Handler) reject(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer, outcome string) error {
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
	w.Header().Set("WWW-Authenticate", challenge)
	return caddyhttp.Error(http.StatusUnauthorized, err)
}

// The access log's api_key field, per outcome. The types are conversions
// of keyRecord, so a field for a known key needs no allocation.
type (
	logOK          keyRecord
	logRateLimited keyRecord
	logOutcome     string
)

func (l *logOK) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("id", l.id)
	enc.AddString("outcome", outcomeOK)
	return nil
}

func (l *logRateLimited) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("id", l.id)
	enc.AddString("outcome", outcomeRateLimited)
	return nil
}

func (l *logOutcome) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("outcome", string(*l))
	return nil
}

var (
	logMissing = func() *logOutcome { o := logOutcome(outcomeMissing); return &o }()
	logInvalid = func() *logOutcome { o := logOutcome(outcomeInvalid); return &o }()

	providerMissing = outcomeProvider(outcomeMissing)
	providerInvalid = outcomeProvider(outcomeInvalid)
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
// carried a key. ok is false when a value is malformed (too long, not
// visible ASCII, empty, badly escaped) or when two sources or two values
// disagree: such a request is rejected without a lookup.
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
		if c.bad {
			return "", 0, false
		}
	}
	return c.key, c.found, true
}

// collector gathers the values extract finds, and fails on the first that
// cannot be a key or differs from one found before.
type collector struct {
	key   string
	found uint64
	bit   uint64
	bad   bool
}

func (c *collector) add(v string) {
	if !validKey(v) || (c.found != 0 && v != c.key) {
		c.bad = true
		return
	}
	c.key = v
	c.found |= c.bit
}

// validKey reports whether v can be a key: 1 to maxKeyLen visible ASCII
// characters.
func validKey(v string) bool {
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
			c.bad = true
			return
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
