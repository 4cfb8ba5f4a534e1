package apikey

import (
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// limiterPoolKey names the one limiter of a Caddy process in the usage pool.
// Every api_key handler shares it, so a key's limit counts across sites that
// accept the same key with the same limit, and its state survives config
// reloads.
const limiterPoolKey = "api_key.limiter"

// limiterSweepInterval is how often state that no longer matters (a key
// back at its full burst) is dropped.
var limiterSweepInterval = time.Minute

const limiterShards = 64

// limiter keeps one GCRA state (a theoretical arrival time) per key and
// limit. A decision updates its state with a compare-and-swap, so
// concurrent requests with one key are counted exactly without a lock; the
// shard locks guard only the maps that find a state. States are keyed by
// the key's digest, not its id: ids are unique only within one keys file
// or site, and two keys that share an id must not share a limit.
type limiter struct {
	shards [limiterShards]limiterShard
	clock  func() int64

	// sweepRaceHook, when set (by a test, before any sweep), runs in
	// sweep between reading an idle state and marking it dead: where a
	// request may come in.
	sweepRaceHook func(*limitState)

	stop    chan struct{}
	stopped sync.WaitGroup
}

type limiterShard struct {
	mu   sync.Mutex
	tats map[bucketKey]*limitState
	_    [48]byte // keep shards on separate cache lines
}

// bucketKey is what a state belongs to: a key and its limit's arithmetic
// (its interval and burst, as Redis's counters are keyed too). A key whose
// limit changes starts afresh; one whose limit is unchanged keeps its
// state, and limits that count alike (10/1s and 600/1m, with one burst)
// share one.
type bucketKey struct {
	digest [32]byte
	gcra   ratelimit.GCRA
}

// limitState is one key's state under one limit. The request path may
// keep a pointer to it (see decide), so that a known key finds its state
// without the map and its lock; the state names its limiter and limit, so
// that such a pointer is only used for what it belongs to.
//
// holder is where that pointer is kept: a key's usage record, one per
// digest for the whole process (usageOf), so one per state. It lives as
// long as the process; sweep clears its pointer to a state it drops, so
// that the state is freed.
type limitState struct {
	tat    atomic.Int64 // deadTAT once swept
	owner  *limiter
	lim    ratelimit.Limit // the limit it was made for
	gcra   ratelimit.GCRA  // lim's, worked out once
	holder atomic.Pointer[atomic.Pointer[limitState]]
}

// deadTAT marks a state that sweep has dropped from its map: whoever
// still holds it looks the key up again, and so finds (or makes) the one
// state the map now has.
const deadTAT = math.MinInt64

// processStart anchors monoNow.
var processStart = time.Now()

// monoNow reads the monotonic clock in nanoseconds since the process
// started. The request path reads it once per request and hands the
// reading to the cache, the limiter and the usage counters: a clock read
// costs 40-70 ns on some virtual machines, as much as a limiter decision.
func monoNow() int64 { return int64(time.Since(processStart)) }

// wallTime converts a monoNow reading to wall-clock time, counting back
// from now: right even if the wall clock was set after the process
// started.
func wallTime(mono int64) time.Time { return time.Now().Add(-time.Duration(monoNow() - mono)) }

// newLimiter returns a limiter that reads clock, or, when clock is nil,
// goes by the time each request read (monoNow).
func newLimiter(clock func() int64) *limiter {
	l := &limiter{clock: clock, stop: make(chan struct{})}
	for i := range l.shards {
		l.shards[i].tats = make(map[bucketKey]*limitState)
	}
	return l
}

// startSweeper drops idle state every interval until Destruct.
func (l *limiter) startSweeper(every time.Duration) {
	l.stopped.Add(1)
	go func() {
		defer l.stopped.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-l.stop:
				return
			case <-t.C:
				l.sweep()
			}
		}
	}()
}

// decide counts one request by the key with this digest against lim, at
// now (a monoNow reading) unless the limiter has a clock of its own.
//
// held, if not nil, is where the caller keeps the key's state between
// requests (a key's usage record, one per digest): a state found there
// that belongs to this limiter and limit is used without the map;
// otherwise the one from the map is, and held is set to it. (A key
// decided against two limits in turn, in two sites, goes through the map
// each time; it is counted right all the same.)
func (l *limiter) decide(held *atomic.Pointer[limitState], digest *[32]byte, lim ratelimit.Limit, now int64) ratelimit.Decision {
	if l.clock != nil {
		now = l.clock()
	}
	var st *limitState
	if held != nil {
		st = held.Load()
	}
	for {
		if st == nil || st.owner != l || (st.lim != lim && st.gcra != lim.GCRA()) {
			st = l.state(digest, lim)
			if held != nil {
				held.Store(st)
				if st.holder.Load() == nil {
					st.holder.CompareAndSwap(nil, held)
				}
			}
		}
		tat := st.tat.Load()
		if tat == deadTAT {
			st = nil // swept since it was found: look again
			continue
		}
		next, d := st.gcra.Decide(tat, now)
		// A denial leaves the state as it is.
		if !d.Allowed || st.tat.CompareAndSwap(tat, next) {
			return d
		}
		// Another request with this key came first: decide again.
	}
}

// state returns the state of the key with this digest under lim, made if
// there is none.
func (l *limiter) state(digest *[32]byte, lim ratelimit.Limit) *limitState {
	k := bucketKey{digest: *digest, gcra: lim.GCRA()}
	// The digest is uniformly random, so any byte of it picks a shard.
	s := &l.shards[digest[31]%limiterShards]
	s.mu.Lock()
	st := s.tats[k]
	if st == nil {
		st = &limitState{owner: l, lim: lim, gcra: k.gcra}
		s.tats[k] = st
	}
	s.mu.Unlock()
	return st
}

// sweep drops every state whose key is back at its full burst: such a
// state decides the next request exactly as a missing one would. A
// dropped state is marked dead in the same compare-and-swap that checks
// it is idle, so a request that decides on it at that moment either comes
// first (and the state stays) or sees it dead and looks again.
func (l *limiter) sweep() int {
	now := monoNow()
	if l.clock != nil {
		now = l.clock()
	}
	dropped := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for k, st := range s.tats {
			tat := st.tat.Load()
			if tat > now {
				continue
			}
			if l.sweepRaceHook != nil {
				l.sweepRaceHook(st)
			}
			if st.tat.CompareAndSwap(tat, deadTAT) {
				delete(s.tats, k)
				st.release()
				dropped++
			}
		}
		s.mu.Unlock()
	}
	return dropped
}

// release clears the holder's pointer to st, a state just marked dead,
// unless it points at a newer state already.
func (st *limitState) release() {
	if h := st.holder.Load(); h != nil {
		h.CompareAndSwap(st, nil)
	}
}

// len counts the states held.
func (l *limiter) len() int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		n += len(s.tats)
		s.mu.Unlock()
	}
	return n
}

// Destruct stops the sweeper once no handler uses the limiter any more.
// Its states are dropped, and their holders let go of them, so that
// neither they nor the limiter stay reachable from keys' usage records.
// (A request still in flight from the config before may make a state
// anew; the key's next request, on the limiter in use, replaces it.)
func (l *limiter) Destruct() error {
	close(l.stop)
	l.stopped.Wait()
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for _, st := range s.tats {
			st.tat.Store(deadTAT)
			st.release()
		}
		clear(s.tats)
		s.mu.Unlock()
	}
	return nil
}

// policyValue is the RateLimit-Policy header value of a limit, as in
// draft-ietf-httpapi-ratelimit-headers-10: a quota of q requests in a
// window of w seconds. The header counts in whole seconds, so a period
// that is not one (such as 100ms) is told as the quota of the whole
// seconds that cover it.
func policyValue(name string, lim ratelimit.Limit) policy {
	w := ratelimit.CeilSeconds(lim.Period)
	q := lim.Count
	if time.Duration(w)*time.Second != lim.Period {
		q = int64(float64(lim.Count) * float64(time.Duration(w)*time.Second) / float64(lim.Period))
	}
	prefix := `"` + name + `"`
	return policy{
		header:    prefix + ";q=" + strconv.FormatInt(q, 10) + ";w=" + strconv.FormatInt(w, 10),
		rateLabel: prefix,
	}
}

// policy is a limit's RateLimit-Policy value and the policy name that
// starts its RateLimit values, both made once.
type policy struct {
	header    string
	rateLabel string
}

var _ caddy.Destructor = (*limiter)(nil)
