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
// give it the same limit, and its state survives config reloads.
const limiterPoolKey = "api_key.limiter"

// limiterSweepInterval is how often state that no longer matters (a key
// back at its full burst) is dropped.
var limiterSweepInterval = time.Minute

const limiterShards = 64

// limiter keeps one GCRA state (an int64) per key and limit. A decision
// reads and writes the state under its shard's lock, so concurrent requests
// with one key are counted exactly.
type limiter struct {
	shards [limiterShards]limiterShard
	clock  func() int64

	stop    chan struct{}
	stopped sync.WaitGroup
}

type limiterShard struct {
	mu   sync.Mutex
	tats map[bucketKey]int64
	_    [40]byte // keep shards on separate cache lines
}

// bucketKey is what a state belongs to: a key id and its limit. A key whose
// limit changes starts afresh; one whose limit is unchanged keeps its state.
type bucketKey struct {
	id       string
	interval time.Duration
	burst    int64
}

// monotonicClock reads the monotonic clock in nanoseconds since start.
func monotonicClock() func() int64 {
	start := time.Now()
	return func() int64 { return int64(time.Since(start)) }
}

func newLimiter(clock func() int64) *limiter {
	l := &limiter{clock: clock, stop: make(chan struct{})}
	for i := range l.shards {
		l.shards[i].tats = make(map[bucketKey]int64)
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

// decide counts one request by the key with id (whose hash is idHash)
// against lim.
func (l *limiter) decide(id string, idHash uint64, lim ratelimit.Limit) ratelimit.Decision {
	now := l.clock()
	k := bucketKey{id: id, interval: lim.Interval(), burst: lim.Burst}
	s := &l.shards[idHash%limiterShards]
	s.mu.Lock()
	tat, d := lim.Decide(s.tats[k], now)
	s.tats[k] = tat
	s.mu.Unlock()
	return d
}

// sweep drops every state whose key is back at its full burst: such a
// state decides the next request exactly as a missing one would.
func (l *limiter) sweep() int {
	now := l.clock()
	dropped := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for k, tat := range s.tats {
			if tat <= now {
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
// draft-ietf-httpapi-ratelimit-headers-10: a quota of count requests in a
// window of the period's seconds.
func policyValue(name string, lim ratelimit.Limit) string {
	w := ratelimit.CeilSeconds(lim.Period)
	return `"` + name + `";q=` + strconv.FormatInt(lim.Count, 10) + ";w=" + strconv.FormatInt(w, 10)
}

var _ caddy.Destructor = (*limiter)(nil)
