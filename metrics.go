package apikey

import (
	"errors"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// MetricsConfig configures the handler's Prometheus metrics, which are
// always on; only per-key series need turning on.
type MetricsConfig struct {
	// PerKey adds series per key id (caddy_api_key_key_requests_total,
	// labels key_id and outcome). The id is the key's id, never the key.
	// Default: false.
	PerKey bool `json:"per_key,omitempty"`

	// MaxKeys caps the distinct key ids with series of their own, per
	// Caddy process; requests of further ids are counted under key_id
	// "other", so that a flood of keys cannot blow up the registry.
	// Default: 1000.
	MaxKeys int `json:"max_keys,omitempty"`
}

const defaultMetricsMaxKeys = 1000

func init() { apiKeyMetrics.once.Do(initMetrics) }

// otherKeyID labels the requests of key ids past the cap.
const otherKeyID = "other"

// apiKeyMetrics are process-wide, so that counts go on across config
// reloads; each config load registers them in its own registry, as
// Caddy's own handlers do.
var apiKeyMetrics = struct {
	once sync.Once

	requests     *prometheus.CounterVec // outcome
	cacheHits    prometheus.Counter
	cacheMisses  prometheus.Counter
	keysLoaded   *prometheus.GaugeVec   // source: a keys file's path, or "config"
	reloadErrors *prometheus.CounterVec // file
	decisions    *prometheus.CounterVec // limit (rate, quota), result (allowed, denied), counters (local, redis)
	keyRequests  *prometheus.CounterVec // key_id, outcome

	// byOutcome are the requests counters of each outcome, looked up
	// once, so that counting a request is one atomic add.
	byOutcome map[string]prometheus.Counter
	ok        prometheus.Counter
	// decided are the decisions counters, by [limit][result][counters].
	decided [2][2][2]prometheus.Counter

	// perKey holds the per-key counters made so far, by keyOutcome;
	// perKeyIDs counts the distinct ids among them.
	perKey    sync.Map
	perKeyIDs atomic.Int64
	idsSeen   sync.Map // key id → struct{}
}{}

// allOutcomes are the values of the outcome label.
var allOutcomes = []string{
	outcomeOK, outcomeMissing, outcomeInvalid, outcomeDisabled, outcomeExpired, outcomeNotYetValid,
	outcomeForbidden, outcomeRateLimited, outcomeQuotaExceeded, outcomeStoreUnavailable, outcomeLimiterUnavailable,
	outcomeTooManyFailures,
}

// Indexes of apiKeyMetrics.decided.
const (
	limitRate, limitQuota        = 0, 1
	resultAllowed, resultDenied  = 0, 1
	countersLocal, countersRedis = 0, 1
)

func initMetrics() {
	const ns, sub = "caddy", "api_key"
	m := &apiKeyMetrics
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "requests_total",
		Help: "Requests seen by api_key handlers, by outcome.",
	}, []string{"outcome"})
	m.cacheHits = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "cache_hits_total",
		Help: "Key lookups answered by the cache (found and not found keys alike).",
	})
	m.cacheMisses = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "cache_misses_total",
		Help: "Key lookups the cache could not answer.",
	})
	m.keysLoaded = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: ns, Subsystem: sub, Name: "keys_loaded",
		Help: "Keys loaded, by source: a keys file's path.",
	}, []string{"source"})
	m.reloadErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "keys_file_reload_errors_total",
		Help: "Versions of a keys file that could not be loaded (the previous keys stayed in use).",
	}, []string{"file"})
	m.decisions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "limiter_decisions_total",
		Help: "Rate-limit and quota decisions, by limit (rate, quota), result (allowed, denied) and where the counters are (local, redis).",
	}, []string{"limit", "result", "counters"})
	m.keyRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "key_requests_total",
		Help: "Requests by key id and outcome (with metrics per_key; ids past the cap are counted as \"other\").",
	}, []string{"key_id", "outcome"})

	m.byOutcome = make(map[string]prometheus.Counter, len(allOutcomes))
	for _, o := range allOutcomes {
		m.byOutcome[o] = m.requests.WithLabelValues(o)
	}
	m.ok = m.byOutcome[outcomeOK]
	for l, limit := range []string{"rate", "quota"} {
		for r, result := range []string{"allowed", "denied"} {
			for c, counters := range []string{"local", "redis"} {
				m.decided[l][r][c] = m.decisions.WithLabelValues(limit, result, counters)
			}
		}
	}
}

// registerMetrics registers the metrics in a config's registry. Several
// handlers of one config register the same collectors: that is no error.
func registerMetrics(reg *prometheus.Registry) error {
	apiKeyMetrics.once.Do(initMetrics)
	if reg == nil {
		return nil
	}
	m := &apiKeyMetrics
	for _, c := range []prometheus.Collector{m.requests, m.cacheHits, m.cacheMisses, m.keysLoaded, m.reloadErrors, m.decisions, m.keyRequests} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

// countOutcome counts one request's outcome, and its key's when per-key
// series are on.
func (h *Handler) countOutcome(outcome string, rec *keyRecord) {
	h.countOutcomeAt(outcome, rec, 0)
}

// countOutcomeAt is countOutcome for a request that read the clock
// already: now is its monoNow reading, or 0 to read it here.
func (h *Handler) countOutcomeAt(outcome string, rec *keyRecord, now int64) {
	if outcome == outcomeOK {
		apiKeyMetrics.ok.Inc()
	} else {
		apiKeyMetrics.byOutcome[outcome].Inc()
	}
	if rec == nil {
		return
	}
	if now == 0 {
		now = monoNow()
	}
	u := countUsage(rec, outcome, now)
	if h.perKeyMax == 0 {
		return
	}
	// An admitted key's series, once labelled with its id, stays so: ids
	// seen are never forgotten (see metricsID), so the series is kept on
	// the key's usage. A series labelled "other" is not kept, since a
	// handler with a higher cap may give the id its own.
	ok := outcome == outcomeOK && u != nil
	if ok {
		if s := u.okSeries.Load(); s != nil && s.id == rec.id {
			s.c.Inc()
			return
		}
	}
	k := keyOutcome{id: h.metricsID(rec.id), outcome: outcome}
	v, found := apiKeyMetrics.perKey.Load(k)
	if !found {
		v = apiKeyMetrics.keyRequests.WithLabelValues(k.id, outcome)
		apiKeyMetrics.perKey.Store(k, v)
	}
	c := v.(prometheus.Counter)
	c.Inc()
	if ok && k.id == rec.id {
		// The first id kept stays: a key with another id on another site
		// takes this slower way, rather than replacing it on every turn.
		u.okSeries.CompareAndSwap(nil, &keySeries{id: rec.id, c: c})
	}
}

// metricsID is the key_id label of id: id itself while the cap on
// distinct ids allows, "other" past it.
func (h *Handler) metricsID(id string) string {
	m := &apiKeyMetrics
	if _, ok := m.idsSeen.Load(id); ok {
		return id
	}
	if m.perKeyIDs.Add(1) > int64(h.perKeyMax) {
		m.perKeyIDs.Add(-1)
		return otherKeyID
	}
	if _, loaded := m.idsSeen.LoadOrStore(id, struct{}{}); loaded {
		m.perKeyIDs.Add(-1)
	}
	return id
}

type keyOutcome struct{ id, outcome string }

// countDecision counts a rate or quota decision.
func countDecision(limit int, allowed bool, redis bool) {
	r, c := resultAllowed, countersLocal
	if !allowed {
		r = resultDenied
	}
	if redis {
		c = countersRedis
	}
	apiKeyMetrics.decided[limit][r][c].Inc()
}
