package apikey

import (
	"strconv"
	"sync"
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

// limiter keeps one GCRA state (an int64) per key and limit. A decision
// reads and writes the state under its shard's lock, so concurrent requests
// with one key are counted exactly. States are keyed by the key's digest,
// not its id: ids are unique only within one keys file or site, and two
// keys that share an id must not share a limit.
type limiter struct {
	shards [limiterShards]limiterShard
	clock  func() int64

	stop    chan struct{}
	stopped sync.WaitGroup
}

type limiterShard struct {
	mu   sync.Mutex
	tats map[bucketKey]*int64
	_    [48]byte // keep shards on separate cache lines
}

// bucketKey is what a state belongs to: a key and its limit. A key whose
// limit changes starts afresh; one whose limit is unchanged keeps its state.
type bucketKey struct {
	digest   [32]byte
	interval time.Duration
	burst    int64
}

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
		l.shards[i].tats = make(map[bucketKey]*int64)
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
func (l *limiter) decide(digest *[32]byte, lim ratelimit.Limit, now int64) ratelimit.Decision {
	if l.clock != nil {
		now = l.clock()
	}
	k := bucketKey{digest: *digest, interval: lim.Interval(), burst: lim.Burst}
	// The digest is uniformly random, so any byte of it picks a shard.
	s := &l.shards[digest[31]%limiterShards]
	s.mu.Lock()
	tat := s.tats[k]
	if tat == nil {
		tat = new(int64)
		s.tats[k] = tat
	}
	var d ratelimit.Decision
	*tat, d = lim.Decide(*tat, now)
	s.mu.Unlock()
	return d
}

// sweep drops every state whose key is back at its full burst: such a
// state decides the next request exactly as a missing one would.
func (l *limiter) sweep() int {
	now := monoNow()
	if l.clock != nil {
		now = l.clock()
	}
	dropped := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for k, tat := range s.tats {
			if *tat <= now {
				delete(s.tats, k)
				dropped++
			}
		}
		s.mu.Unlock()
	}
	return dropped
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
func (l *limiter) Destruct() error {
	close(l.stop)
	l.stopped.Wait()
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
