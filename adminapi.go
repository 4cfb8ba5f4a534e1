package apikey

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/keystile/caddy-apikey/internal/quota"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves the api_key endpoints of Caddy's admin API:
//
//	GET  /api_key/keys           the keys of every api_key handler (never hashes)
//	GET  /api_key/usage[?id=ID]  requests by outcome, quota and last use, per key
//	POST /api_key/reload         read the keys files now; says what changed
//	POST /api_key/cache/purge    forget every cached lookup
//
// Each answer is a list with one entry per api_key handler of the running
// config, named by the handler's name (see Handler.Name), sorted by name.
// A query that does not parse, or names a parameter the endpoint does not
// take, is answered 400.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.api_key",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes.
func (adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/api_key/keys", Handler: caddy.AdminHandlerFunc(handleKeys)},
		{Pattern: "/api_key/usage", Handler: caddy.AdminHandlerFunc(handleUsage)},
		{Pattern: "/api_key/reload", Handler: caddy.AdminHandlerFunc(handleReload)},
		{Pattern: "/api_key/cache/purge", Handler: caddy.AdminHandlerFunc(handlePurge)},
	}
}

// live are the provisioned handlers not yet cleaned up, in provision
// order. During a config reload the old config's handlers are here too,
// until they are cleaned up.
var live struct {
	sync.Mutex
	handlers []*Handler
}

func addLive(h *Handler) {
	live.Lock()
	live.handlers = append(live.handlers, h)
	live.Unlock()
}

func removeLive(h *Handler) {
	live.Lock()
	live.handlers = slices.DeleteFunc(live.handlers, func(x *Handler) bool { return x == h })
	live.Unlock()
}

// liveHandlers returns the live handlers sorted by name (Caddy provisions
// servers in no fixed order).
func liveHandlers() []*Handler {
	live.Lock()
	hs := slices.Clone(live.handlers)
	live.Unlock()
	slices.SortStableFunc(hs, func(a, b *Handler) int { return strings.Compare(a.name, b.name) })
	return hs
}

// keyUsage counts one key's requests since Caddy started, across config
// reloads: by outcome, and when it was last used.
type keyUsage struct {
	counts   [len(usageOutcomes)]atomic.Int64
	lastSeen atomic.Int64 // monoNow reading; made wall-clock time when shown (see wallTime)
	// okSeries is the key's per-key series of outcome ok, once made with
	// its id as the label, so that an admitted request finds it without
	// two sync.Map lookups (see countOutcomeAt).
	okSeries atomic.Pointer[keySeries]
	// limit is the key's rate-limit state, once found, so that a
	// request finds it without the limiter's map (see limiter.decide).
	limit atomic.Pointer[limitState]
}

// keySeries is a per-key counter and the key id it is labelled with.
type keySeries struct {
	id string
	c  prometheus.Counter
}

// usageOutcomes are the outcomes counted per key (those of known keys).
var usageOutcomes = [...]string{
	outcomeOK, outcomeDisabled, outcomeExpired, outcomeNotYetValid, outcomeForbidden,
	outcomeRateLimited, outcomeQuotaExceeded, outcomeLimiterUnavailable,
}

func usageIndex(outcome string) int {
	for i, o := range usageOutcomes {
		if o == outcome {
			return i
		}
	}
	return -1
}

// usages holds every key's usage by digest. A record finds its own once
// and keeps it (keyRecord.usage), so that a request costs no map lookup.
var usages struct {
	sync.Mutex
	m map[[32]byte]*keyUsage
}

func usageOf(rec *keyRecord) *keyUsage {
	if u := rec.usage.Load(); u != nil {
		return u
	}
	usages.Lock()
	if usages.m == nil {
		usages.m = make(map[[32]byte]*keyUsage)
	}
	u := usages.m[rec.digest]
	if u == nil {
		u = new(keyUsage)
		usages.m[rec.digest] = u
	}
	usages.Unlock()
	rec.usage.Store(u)
	return u
}

// countUsage counts a request of a known key, made at now (monoNow), and
// returns the key's usage (nil for an outcome not counted per key).
func countUsage(rec *keyRecord, outcome string, now int64) *keyUsage {
	i := usageIndex(outcome)
	if i < 0 {
		return nil
	}
	u := usageOf(rec)
	u.counts[i].Add(1)
	u.lastSeen.Store(now)
	return u
}

// adminKey is a key as the admin API shows it: never its hash.
type adminKey struct {
	ID        string `json:"id"`
	Name      string `json:"name,omitempty"`
	Owner     string `json:"owner,omitempty"`
	Plan      string `json:"plan,omitempty"`
	NotBefore string `json:"not_before,omitempty"`
	Expires   string `json:"expires,omitempty"`
	State     string `json:"state"`
	Source    string `json:"source"` // config, keys_file or redis
}

// adminHandlerKeys is one handler's answer to /api_key/keys.
type adminHandlerKeys struct {
	Handler string     `json:"handler"`
	Keys    []adminKey `json:"keys"`
	Error   string     `json:"error,omitempty"`
}

func handleKeys(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return methodNotAllowed(r)
	}
	if _, err := adminQuery(r); err != nil {
		return err
	}
	var out []adminHandlerKeys
	for _, h := range liveHandlers() {
		ak := adminHandlerKeys{Handler: h.name, Keys: []adminKey{}}
		recs, err := h.records(r.Context())
		if err != nil {
			ak.Error = err.Error()
		}
		now := time.Unix(0, h.now())
		for _, rs := range recs {
			ak.Keys = append(ak.Keys, adminKeyOf(rs.rec, rs.source, now))
		}
		out = append(out, ak)
	}
	return writeJSON(w, out)
}

func adminKeyOf(rec *keyRecord, source string, now time.Time) adminKey {
	k := adminKey{ID: rec.id, Name: rec.name, Owner: rec.owner, Plan: rec.plan, State: keyState(rec, now), Source: source}
	k.NotBefore, k.Expires = recordTime(rec.notBefore), recordTime(rec.expires)
	return k
}

func recordTime(ns int64) string {
	if ns == 0 {
		return ""
	}
	return time.Unix(0, ns).UTC().Format(time.RFC3339Nano)
}

type sourcedRecord struct {
	rec    *keyRecord
	source string
}

// adminRedisListLimit caps the keys the admin API lists from Redis.
const adminRedisListLimit = 10000

// records returns the handler's keys, sorted by id: those in the config,
// the keys file's, and Redis's (up to adminRedisListLimit).
func (h *Handler) records(ctx context.Context) ([]sourcedRecord, error) {
	var out []sourcedRecord
	for _, rec := range h.inline {
		out = append(out, sourcedRecord{rec, "config"})
	}
	if h.keysFile != nil {
		for _, rec := range h.keysFile.set.Load().all() {
			out = append(out, sourcedRecord{rec, "keys_file"})
		}
	}
	var err error
	if h.redisStore {
		var recs []*keyRecord
		recs, err = h.redis.listRecords(ctx, adminRedisListLimit)
		for _, rec := range recs {
			out = append(out, sourcedRecord{rec, "redis"})
		}
	}
	slices.SortFunc(out, func(a, b sourcedRecord) int { return strings.Compare(a.rec.id, b.rec.id) })
	return out, err
}

// adminUsage is one key's usage.
type adminUsage struct {
	ID       string           `json:"id"`
	Requests map[string]int64 `json:"requests"`
	LastSeen string           `json:"last_seen,omitempty"`
	Quota    *adminQuota      `json:"quota,omitempty"`
}

type adminQuota struct {
	Limit     string `json:"limit"`
	Used      int64  `json:"used"`
	Remaining int64  `json:"remaining"`
	Resets    string `json:"resets"`
	Counters  string `json:"counters"` // local or redis
}

type adminHandlerUsage struct {
	Handler string       `json:"handler"`
	Keys    []adminUsage `json:"keys"`
	Error   string       `json:"error,omitempty"`
}

func handleUsage(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return methodNotAllowed(r)
	}
	query, err := adminQuery(r, "id")
	if err != nil {
		return err
	}
	only := query.Get("id")
	if query.Has("id") && only == "" {
		return badRequest(errors.New("query parameter id is empty"))
	}
	var out []adminHandlerUsage
	found := false
	for _, h := range liveHandlers() {
		au := adminHandlerUsage{Handler: h.name, Keys: []adminUsage{}}
		recs, err := h.records(r.Context())
		if err != nil {
			au.Error = err.Error()
		}
		for _, rs := range recs {
			if only != "" && rs.rec.id != only {
				continue
			}
			found = true
			au.Keys = append(au.Keys, h.usageOfKey(r.Context(), rs.rec))
		}
		out = append(out, au)
	}
	if only != "" && !found {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no key with id %q", only)}
	}
	return writeJSON(w, out)
}

func (h *Handler) usageOfKey(ctx context.Context, rec *keyRecord) adminUsage {
	u := usageOf(rec)
	au := adminUsage{ID: rec.id, Requests: make(map[string]int64)}
	for i, o := range usageOutcomes {
		if n := u.counts[i].Load(); n != 0 {
			au.Requests[o] = n
		}
	}
	if mono := u.lastSeen.Load(); mono != 0 {
		au.LastSeen = wallTime(mono).UTC().Truncate(time.Second).Format(time.RFC3339)
	}
	var pl *plan
	if rec.plan != "" {
		pl = h.plans[rec.plan]
	}
	q := h.quotaOf(rec, pl)
	if q.IsZero() {
		return au
	}
	var d quota.Decision
	counters := "local"
	if h.redisLimits {
		counters = "redis"
		d = h.redis.peekQuota(ctx, &rec.digest, q)
	} else if s := h.quotas.store.Load(); s != nil {
		d = s.Peek(quotaName(rec), q)
	} else {
		_, end := q.Period.Bounds(time.Now())
		d = quota.Decision{Allowed: true, Remaining: q.Count, Reset: time.Until(end)}
	}
	au.Quota = &adminQuota{Limit: q.String(), Used: d.Used, Remaining: d.Remaining,
		Resets: time.Now().Add(d.Reset).UTC().Truncate(time.Second).Format(time.RFC3339), Counters: counters}
	return au
}

// adminReload is one handler's answer to /api_key/reload.
type adminReload struct {
	Handler string `json:"handler"`
	File    string `json:"file,omitempty"`
	Keys    int    `json:"keys"`
	Added   int    `json:"added"`
	Removed int    `json:"removed"`
	Changed bool   `json:"changed"`
	Error   string `json:"error,omitempty"`
}

func handleReload(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return methodNotAllowed(r)
	}
	if _, err := adminQuery(r); err != nil {
		return err
	}
	var out []adminReload
	failed := false
	for _, h := range liveHandlers() {
		ar := adminReload{Handler: h.name}
		switch {
		case h.keysFile != nil:
			ar.File = h.keysFile.path
			res, err := h.keysFile.reloadNow()
			ar.Keys, ar.Added, ar.Removed, ar.Changed = res.keys, res.added, res.removed, res.changed
			if err != nil {
				ar.Error, failed = err.Error(), true
			}
		default:
			ar.Keys = len(h.inline)
			if h.redisStore {
				ar.Error = "keys in Redis need no reload: every change is published"
			}
		}
		out = append(out, ar)
	}
	if failed {
		w.WriteHeader(http.StatusUnprocessableEntity)
	}
	return writeJSON(w, out)
}

type adminPurge struct {
	Handler string `json:"handler"`
	Purged  bool   `json:"purged"`
}

func handlePurge(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return methodNotAllowed(r)
	}
	if _, err := adminQuery(r); err != nil {
		return err
	}
	var out []adminPurge
	for _, h := range liveHandlers() {
		h.cache.purge()
		out = append(out, adminPurge{Handler: h.name, Purged: true})
	}
	return writeJSON(w, out)
}

func methodNotAllowed(r *http.Request) error {
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
}

// adminQuery parses the query of a request to an endpoint that takes the
// parameters named in allowed, each at most once. r.URL.Query would drop
// what does not parse and answer as if it had not been asked. Errors never
// quote the query: a key pasted into the wrong place must not come back in
// the answer, nor in the admin API's error log.
func adminQuery(r *http.Request, allowed ...string) (url.Values, error) {
	query, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		if errors.As(err, new(url.EscapeError)) {
			return nil, badRequest(errors.New(`query does not parse: a "%" must start an escape such as %2F`))
		}
		// The other error of url.ParseQuery, a semicolon, quotes nothing.
		return nil, badRequest(fmt.Errorf("query does not parse: %w", err))
	}
	// In name order, so that a query with two faults gets the same
	// answer every time.
	for _, name := range slices.Sorted(maps.Keys(query)) {
		values := query[name]
		switch {
		case !slices.Contains(allowed, name) && len(allowed) == 0:
			return nil, badRequest(fmt.Errorf("%s takes no query parameters", r.URL.Path))
		case !slices.Contains(allowed, name):
			return nil, badRequest(fmt.Errorf("unknown query parameter: %s takes only %s", r.URL.Path, strings.Join(allowed, ", ")))
		case len(values) > 1:
			return nil, badRequest(fmt.Errorf("query parameter %s given %d times", name, len(values)))
		}
	}
	return query, nil
}

func badRequest(err error) error {
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
}

func writeJSON(w http.ResponseWriter, v any) error {
	if v == nil {
		v = []struct{}{}
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// listRecords reads up to limit key records from Redis (from every master
// of a Cluster); records that do not check out are skipped.
func (b *redisBackend) listRecords(ctx context.Context, limit int) ([]*keyRecord, error) {
	pattern := globEscape(b.schema.keyKey("")) + "*"
	keyLen := len(b.schema.keyKey("")) + 64
	var mu sync.Mutex
	var names []string
	scan := func(ctx context.Context, c redis.Cmdable) error {
		var cursor uint64
		for {
			cctx, cancel := b.command(ctx)
			keys, next, err := c.Scan(cctx, cursor, pattern, 1000).Result()
			cancel()
			if err != nil {
				return err
			}
			mu.Lock()
			for _, k := range keys {
				if len(k) == keyLen && isLowerHex(k[keyLen-64:]) {
					names = append(names, k)
				}
			}
			full := len(names) >= limit
			mu.Unlock()
			if cursor = next; cursor == 0 || full {
				return nil
			}
		}
	}
	var err error
	if cc, ok := b.client.(*redis.ClusterClient); ok {
		err = cc.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error { return scan(ctx, node) })
	} else {
		err = scan(ctx, b.client)
	}
	if err != nil {
		return nil, err
	}
	var out []*keyRecord
	for _, name := range names {
		if len(out) >= limit {
			break
		}
		var d [32]byte
		if _, err := hex.Decode(d[:], []byte(name[keyLen-64:])); err != nil {
			continue
		}
		rec, err := b.lookup(ctx, &d)
		var bad badRecordError
		switch {
		case errors.As(err, &bad), err == nil && rec == nil:
			continue
		case err != nil:
			return out, err
		}
		out = append(out, rec)
	}
	return out, nil
}

// peekQuota reads a key's quota counter in Redis without counting.
func (b *redisBackend) peekQuota(ctx context.Context, digest *[32]byte, q quota.Quota) quota.Decision {
	now := time.Now()
	start, end := q.Period.Bounds(now)
	cctx, cancel := b.command(ctx)
	used, err := b.client.Get(cctx, b.schema.quotaKey(hex.EncodeToString(digest[:]), q, start)).Int64()
	cancel()
	if err != nil && !errors.Is(err, redis.Nil) {
		used = 0
	}
	return quota.Decision{Allowed: used < q.Count, Used: used, Remaining: max(0, q.Count-used), Reset: end.Sub(now), Window: end.Sub(start)}
}
