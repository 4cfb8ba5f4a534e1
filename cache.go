package apikey

import (
	"encoding/binary"
	"math"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/ristretto/v2"
)

// keyCache remembers recent lookups by key digest, found (positive) and,
// for lookups in Redis, not found (negative), so that a repeated key costs
// one cache read.
//
// Invariants:
//   - It is keyed by the first 8 bytes of the SHA-256 digest, never by a
//     key; every entry holds the whole digest and a hit is only a hit when
//     all 32 bytes match.
//   - Each entry records the generation of the key set it was looked up in;
//     an entry from another generation is a miss. Replacing the key set thus
//     purges the cache at once, with no window in which a removed key is
//     still found.
//   - It is a cache, never the truth: ristretto may drop a Set or evict any
//     entry, and the caller then reads the key set again.
//   - Entries expire by the time the request read (monoNow), which the
//     caller hands in: ristretto's own TTL would read the clock again on
//     every Get. Ristretto keeps an expired entry (and the record it
//     points to) until it evicts it or a put replaces it; get treats it as
//     a miss. Memory stays bounded by size all the same.
//   - Each entry costs 1 against MaxCost (internal cost ignored), so size
//     is the number of entries it keeps.
//   - After close it answers nothing and keeps nothing. On a config reload
//     Caddy cleans up the old handlers while their last requests may still
//     run, and ristretto panics if used while it closes. So every use is
//     counted in inflight before closed is read, and ristretto is closed
//     only once closed is set and inflight has come back to zero: a use
//     that started before close finishes first, one that starts after sees
//     closed and stays away.
type keyCache struct {
	c        *ristretto.Cache[uint64, *cacheEntry]
	epoch    atomic.Uint64 // added to every generation: purge bumps it
	ttl      time.Duration
	negTTL   time.Duration
	closed   atomic.Bool
	inflight atomic.Int64
}

// cacheCloseDelay is how long a closed cache waits between looks at its
// uses in flight before it stops ristretto.
const cacheCloseDelay = 100 * time.Millisecond

// enter counts a use of ristretto; it reports false, and counts nothing,
// once the cache is closed.
func (kc *keyCache) enter() bool {
	kc.inflight.Add(1)
	if kc.closed.Load() {
		kc.inflight.Add(-1)
		return false
	}
	return true
}

func (kc *keyCache) leave() { kc.inflight.Add(-1) }

// maxCacheSize bounds the size setting: ristretto allocates counters for
// ten times the size up front.
const maxCacheSize = 1 << 24

type cacheEntry struct {
	digest  [32]byte
	gen     uint64
	expires int64      // monoNow time
	rec     *keyRecord // nil for a key that is not in the set
}

func newKeyCache(size int64, ttl, negTTL time.Duration) (*keyCache, error) {
	c, err := ristretto.NewCache(&ristretto.Config[uint64, *cacheEntry]{
		NumCounters:        size * 10,
		MaxCost:            size,
		BufferItems:        64,
		IgnoreInternalCost: true,
	})
	if err != nil {
		return nil, err
	}
	return &keyCache{c: c, ttl: ttl, negTTL: negTTL}, nil
}

// get returns the cached lookup of digest in the set of generation gen, if
// it has not expired at now (monoNow): the record (nil if the key is known
// not to exist) and whether there was one.
func (kc *keyCache) get(digest *[32]byte, gen uint64, now int64) (*keyRecord, bool) {
	if !kc.enter() {
		return nil, false
	}
	e, ok := kc.c.Get(binary.LittleEndian.Uint64(digest[:8]))
	kc.leave()
	if !ok || e.gen != gen+kc.epoch.Load() || now >= e.expires || e.digest != *digest {
		return nil, false
	}
	return e.rec, true
}

// put remembers the lookup of digest in the set of generation gen, made at
// now (monoNow).
func (kc *keyCache) put(digest *[32]byte, gen uint64, rec *keyRecord, now int64) {
	if !kc.enter() {
		return
	}
	defer kc.leave()
	ttl := kc.ttl
	if rec == nil {
		ttl = kc.negTTL
	}
	if ttl <= 0 {
		return
	}
	expires := now + int64(ttl)
	if expires < now {
		expires = math.MaxInt64 // a ttl of centuries
	}
	kc.c.Set(binary.LittleEndian.Uint64(digest[:8]), &cacheEntry{digest: *digest, gen: gen + kc.epoch.Load(), expires: expires, rec: rec}, 1)
}

// purge makes every entry a miss: entries of the epoch before do not match
// any more.
func (kc *keyCache) purge() { kc.epoch.Add(1 << 32) }

// Destruct closes the cache once no handler in cachePool uses it.
func (kc *keyCache) Destruct() error {
	kc.close()
	return nil
}

// close stops the cache at once, and ristretto in the background once no
// use of it is in flight.
func (kc *keyCache) close() {
	if kc.closed.Swap(true) {
		return
	}
	go func() {
		for kc.inflight.Load() != 0 {
			time.Sleep(cacheCloseDelay)
		}
		kc.c.Close()
	}()
}
