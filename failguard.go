package apikey

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// The brute-force guard: a client address that makes too many failed key
// attempts (invalid keys) is answered 429, outcome too_many_failures,
// before any hashing, cache or store work.

const outcomeTooManyFailures = "too_many_failures"

// defaultMaxFailures is the guard's default limit.
const defaultMaxFailures = "20/1m"

// failGuardShards and failGuardPerShard bound the guard's memory: at most
// 64 × 1024 addresses (a few MB) however many addresses attack; when a
// shard is full, the entry to drop is one whose failures have run out if
// one of the first few looked at has, else any.
const (
	failGuardShards   = 64
	failGuardPerShard = 1024
)

// failGuard keeps one GCRA state per client address that has failed: its
// failures are requests against lim, and an address is blocked while its
// allowance is used up.
type failGuard struct {
	lim    ratelimit.Limit
	clock  func() int64
	count  atomic.Int64 // addresses held, so that a guard with none costs one load
	shards [failGuardShards]struct {
		mu   sync.Mutex
		tats map[netip.Addr]int64
		_    [40]byte
	}
}

func newFailGuard(lim ratelimit.Limit, clock func() int64) *failGuard {
	g := &failGuard{lim: lim, clock: clock}
	for i := range g.shards {
		g.shards[i].tats = make(map[netip.Addr]int64)
	}
	return g
}

func (g *failGuard) shard(a netip.Addr) int {
	b := a.As16()
	return int(b[15]^b[14]^b[13]) % failGuardShards
}

// blocked reports whether a has used up its failures, and for how long.
func (g *failGuard) blocked(a netip.Addr) (bool, time.Duration) {
	if g.count.Load() == 0 {
		return false, 0
	}
	s := &g.shards[g.shard(a)]
	s.mu.Lock()
	tat, ok := s.tats[a]
	s.mu.Unlock()
	if !ok {
		return false, 0
	}
	// Blocked when one more failure would not fit: GCRA's own test,
	// without taking the allowance.
	_, d := g.lim.Decide(tat, g.clock())
	if d.Allowed {
		return false, 0
	}
	return true, d.RetryAfter
}

// fail counts one failed attempt from a.
func (g *failGuard) fail(a netip.Addr) {
	now := g.clock()
	s := &g.shards[g.shard(a)]
	s.mu.Lock()
	defer s.mu.Unlock()
	tat, ok := s.tats[a]
	if !ok && len(s.tats) >= failGuardPerShard {
		g.evict(s.tats, now)
	}
	tat, _ = g.lim.Decide(tat, now)
	s.tats[a] = tat
	if !ok {
		g.count.Add(1)
	}
}

// evict drops one entry of a full shard: one whose failures have run out,
// if one of the first 8 looked at has, else the first.
func (g *failGuard) evict(tats map[netip.Addr]int64, now int64) {
	var first netip.Addr
	n := 0
	for a, tat := range tats {
		if tat <= now {
			delete(tats, a)
			g.count.Add(-1)
			return
		}
		if n == 0 {
			first = a
		}
		if n++; n == 8 {
			break
		}
	}
	delete(tats, first)
	g.count.Add(-1)
}

// sweep drops the addresses whose failures have run out.
func (g *failGuard) sweep() {
	now := g.clock()
	for i := range g.shards {
		s := &g.shards[i]
		s.mu.Lock()
		for a, tat := range s.tats {
			if tat <= now {
				delete(s.tats, a)
				g.count.Add(-1)
			}
		}
		s.mu.Unlock()
	}
}

// len counts the addresses held.
func (g *failGuard) len() int { return int(g.count.Load()) }
