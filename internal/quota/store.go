package quota

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// ErrClosed is returned by Flush after Close: the counts in memory will not
// reach the disk any more.
var ErrClosed = errors.New("store is closed")

const (
	// bucketName is the one bucket of a quota store file.
	bucketName = "counts"

	// defaultFlushEvery bounds what a crash loses when the caller passes no
	// flush interval.
	defaultFlushEvery = time.Second

	// lockTimeout is how long Open waits for the file lock. bbolt waits
	// forever by default, which would hang a config load when another
	// process (an old Caddy still running) holds the file.
	lockTimeout = 2 * time.Second

	// keySuffixLen is the length of what follows the name in a disk key:
	// a zero byte, the period and the 8-byte period start.
	keySuffixLen = 1 + 1 + 8

	// numShards spreads counters over several locks so that requests for
	// different keys do not all meet on one RWMutex's reader count.
	numShards = 16
)

// Decision is the outcome of Take or Peek: whether the request is admitted
// and what a client needs to pace itself.
type Decision struct {
	// Allowed reports whether the request is (for Peek: would be) admitted.
	Allowed bool
	// Used is the period's count after this decision.
	Used int64
	// Remaining is Count minus Used, never negative (Used can exceed a
	// Count that was lowered during the period).
	Remaining int64
	// Reset is the time until the period ends. Rounding it up to whole
	// seconds for a header is the caller's job.
	Reset time.Duration
	// Window is the length of the current period, which varies for days
	// and months, for a RateLimit-Policy "w" parameter.
	Window time.Duration
}

// counterKey names one counter: a key's count in one period. The period
// start is part of it so that a new period starts from zero without anyone
// resetting anything, and the Count is not, so that a quota changed by a
// config reload keeps what was used.
type counterKey struct {
	name   string
	period Period
	start  int64 // Unix seconds
}

// counter is the count of one counterKey. used is what Take changes, with
// atomics so that the hot path holds no lock while counting; flushed is
// what the file holds, so a counter is dirty while they differ. That way a
// failed flush leaves it dirty without anyone having to remember it.
type counter struct {
	used    atomic.Int64
	flushed int64 // guarded by Store.flushMu
}

// shard is one part of the counter map. The padding keeps two shards'
// locks off one cache line.
type shard struct {
	mu sync.RWMutex
	m  map[counterKey]*counter
	_  [64]byte
}

// Store counts admitted requests per key and period in memory and persists
// the counts in a bbolt file. Take and Peek never touch the disk: a
// background goroutine writes the changed counts every flush interval, and
// Close writes the rest, so a clean shutdown loses nothing and a crash
// loses at most one interval's counts.
//
// The file holds one bucket, "counts", mapping name + "\x00" + period byte +
// 8-byte big-endian Unix period start to an 8-byte big-endian count.
type Store struct {
	path   string
	now    func() time.Time
	db     *bolt.DB
	seed   maphash.Seed
	shards [numShards]shard

	// update runs a write transaction; it is db.Update, and a seam for
	// tests that need a flush to fail.
	update func(func(*bolt.Tx) error) error

	flushMu    sync.Mutex
	closed     bool
	bgErr      error // the last background flush error not yet reported
	prunedHour int64 // the Unix start of the hour of the last prune

	// onFlush, if set, hears the result of every background flush, so
	// that the caller can log a failure when it happens.
	onFlush atomic.Pointer[func(error)]

	ticker *time.Ticker // nil when tests drive the flusher
	tick   <-chan time.Time
	stop   chan struct{}
	done   chan struct{}
}

// openOptions are the knobs tests need that callers do not.
type openOptions struct {
	lockTimeout time.Duration
	tick        <-chan time.Time // drives the flusher instead of a ticker
}

// Open opens the quota store at path, creating its parent directories
// (0700) and the file (0600) if missing, and loads the counts of the
// current periods. A file that is not a quota store or is damaged is an
// error naming it, never a silent reset, since a reset would hand every key
// its quota again. A file locked by another process is an error after two
// seconds rather than a hang.
//
// A background goroutine flushes every flushEvery (one second when zero or
// negative); now is the clock (time.Now when nil). Close the store to stop
// the goroutine and keep the last counts.
func Open(path string, flushEvery time.Duration, now func() time.Time) (*Store, error) {
	return open(path, flushEvery, now, openOptions{lockTimeout: lockTimeout})
}

func open(path string, flushEvery time.Duration, now func() time.Time, opt openOptions) (*Store, error) {
	if now == nil {
		now = time.Now
	}
	if flushEvery <= 0 {
		flushEvery = defaultFlushEvery
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("opening quota store %s: %w", path, err)
	}
	s := &Store{
		path: path,
		now:  now,
		seed: maphash.MakeSeed(),
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
	for i := range s.shards {
		s.shards[i].m = make(map[counterKey]*counter)
	}
	// A new file has nothing to load; anything else that is not a regular
	// file is left for bbolt to reject.
	if info, err := os.Stat(path); err == nil && info.Mode().IsRegular() && info.Size() > 0 {
		if err := s.load(opt.lockTimeout); err != nil {
			return nil, err
		}
	}
	db, err := openBolt(path, &bolt.Options{Timeout: opt.lockTimeout})
	if err != nil {
		return nil, openError(path, opt.lockTimeout, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists([]byte(bucketName))
		return err
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("initializing quota store %s: %w", path, err)
	}
	s.db = db
	s.update = db.Update
	s.tick = opt.tick
	if s.tick == nil {
		s.ticker = time.NewTicker(flushEvery)
		s.tick = s.ticker.C
	}
	go s.flushLoop()
	return s, nil
}

// openError describes a failed bolt.Open of the file at path.
func openError(path string, lockTimeout time.Duration, err error) error {
	if errors.Is(err, bolterrors.ErrTimeout) {
		return fmt.Errorf("opening quota store %s: locked by another process? gave up after %s: %w", path, lockTimeout, err)
	}
	return fmt.Errorf("opening quota store %s: %w", path, err)
}

// openBolt is bolt.Open turned panic-safe: bbolt trusts the pages it maps,
// and a damaged file must be an error, not a crash of the server. A panic
// inside bolt.Open leaves the file mapped, and so locked, until the process
// exits; load reads a file read-only first, where bolt.Open reads no more
// than the meta pages, so that this does not happen for a damaged file.
func openBolt(path string, options *bolt.Options) (db *bolt.DB, err error) {
	defer func() {
		if r := recover(); r != nil {
			db, err = nil, fmt.Errorf("damaged file: %v", r)
		}
	}()
	return bolt.Open(path, 0o600, options)
}

// load opens the file read-only, checks its structure and layout, and
// loads the counters of the current periods. Counters of periods that have
// ended stay on disk until the first Flush prunes them.
//
// It does this read-only and before the read-write Open because bbolt
// panics on some damage (a broken freelist, which a read-write Open reads
// at once); a read-only handle is one load can always close again.
func (s *Store) load(lockTimeout time.Duration) error {
	db, err := openBolt(s.path, &bolt.Options{Timeout: lockTimeout, ReadOnly: true})
	if err != nil {
		return openError(s.path, lockTimeout, err)
	}
	err = s.loadFrom(db)
	if cerr := db.Close(); cerr != nil && err == nil {
		err = fmt.Errorf("reading quota store %s: closing it: %w", s.path, cerr)
	}
	return err
}

func (s *Store) loadFrom(db *bolt.DB) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("reading quota store %s: damaged file: %v", s.path, r)
		}
	}()
	now := s.now()
	var current [Month + 1]int64
	for p := Hour; p <= Month; p++ {
		start, _ := p.Bounds(now)
		current[p] = start.Unix()
	}
	err = db.View(func(tx *bolt.Tx) error {
		// Check walks every page, so a damaged page is found now rather
		// than by a flush hours later. It must be drained to the end: it
		// reads pages from its own goroutine until it closes the channel.
		var checkErr error
		for err := range tx.Check() {
			if checkErr == nil {
				checkErr = err
			}
		}
		if checkErr != nil {
			return fmt.Errorf("damaged file: %w", checkErr)
		}
		b := tx.Bucket([]byte(bucketName))
		if b == nil {
			// An empty file is a new store; a file with other buckets
			// belongs to someone else and must not be written to.
			return tx.ForEach(func(name []byte, _ *bolt.Bucket) error {
				return fmt.Errorf("not a quota store: it holds bucket %q and no bucket %q", name, bucketName)
			})
		}
		return b.ForEach(func(k, v []byte) error {
			key, ok := decodeKey(k)
			if !ok {
				return fmt.Errorf("malformed key %q", k)
			}
			if v == nil {
				return fmt.Errorf("counter %s: a bucket, want an 8-byte count", key)
			}
			if len(v) != 8 {
				return fmt.Errorf("counter %s: value is %d bytes, want 8", key, len(v))
			}
			n := binary.BigEndian.Uint64(v)
			if n > math.MaxInt64 {
				return fmt.Errorf("counter %s: count %d out of range", key, n)
			}
			if key.start >= current[key.period] {
				c := &counter{flushed: int64(n)}
				c.used.Store(int64(n))
				s.shard(key.name).m[key] = c
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("reading quota store %s: %w", s.path, err)
	}
	return nil
}

// Take counts one request against q for the counter name, if q admits it:
// it is admitted iff fewer than q.Count requests were admitted in the
// current period, so denied requests do not use up the quota. name is an
// opaque counter name of any bytes (the caller passes a digest, never a
// raw key); Take copies it when it creates the counter.
// Counters are per name, period kind and period start, so a changed Count
// keeps the used count. A zero Quota, or one with an unknown Period,
// admits everything and counts nothing.
//
// Take finds the counter under a shard's read lock and counts with a
// compare-and-swap, so that requests of one key do not queue; it does no
// disk I/O and does not allocate once the counter exists. After Close it
// still counts, in memory only.
func (s *Store) Take(name string, q Quota) Decision {
	if q.IsZero() || !q.Period.valid() {
		return Decision{Allowed: true}
	}
	now := s.now()
	start, end := q.Period.Bounds(now)
	c := s.counter(counterKey{name: name, period: q.Period, start: start.Unix()})
	used := c.used.Load()
	for used < q.Count {
		if c.used.CompareAndSwap(used, used+1) {
			return decide(true, used+1, q, now, start, end)
		}
		used = c.used.Load()
	}
	return decide(false, used, q, now, start, end)
}

// Peek reports the state of the counter name for q without counting;
// Allowed reports whether a Take would be admitted now. It creates no
// counter, so peeking at unknown names costs no memory.
func (s *Store) Peek(name string, q Quota) Decision {
	if q.IsZero() || !q.Period.valid() {
		return Decision{Allowed: true}
	}
	now := s.now()
	start, end := q.Period.Bounds(now)
	var used int64
	sh := s.shard(name)
	sh.mu.RLock()
	c := sh.m[counterKey{name: name, period: q.Period, start: start.Unix()}]
	sh.mu.RUnlock()
	if c != nil {
		used = c.used.Load()
	}
	return decide(used < q.Count, used, q, now, start, end)
}

func decide(allowed bool, used int64, q Quota, now, start, end time.Time) Decision {
	return Decision{
		Allowed:   allowed,
		Used:      used,
		Remaining: max(q.Count-used, 0),
		Reset:     end.Sub(now),
		Window:    end.Sub(start),
	}
}

func (s *Store) shard(name string) *shard {
	return &s.shards[maphash.String(s.seed, name)%numShards]
}

// counter returns the counter of k, creating it if needed. The read lock
// covers the common case, a counter that exists; only the first request of
// a key in a period takes the write lock.
func (s *Store) counter(k counterKey) *counter {
	sh := s.shard(k.name)
	sh.mu.RLock()
	c := sh.m[k]
	sh.mu.RUnlock()
	if c != nil {
		return c
	}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if c = sh.m[k]; c == nil {
		// The map outlives the request: keep a copy of the name, not
		// the caller's bytes, which may be a view of its own memory.
		k.name = strings.Clone(k.name)
		c = new(counter)
		sh.m[k] = c
	}
	return c
}

// Flush writes the counters that changed since the last flush in one
// transaction. Once an hour (the shortest period) it also deletes, from
// memory and disk, the counters of periods that ended more than one period
// ago. The previous period is kept so that a request racing the boundary
// never finds its counter gone.
//
// On error the counters stay dirty and the next flush retries them. The
// error of a background flush is kept and returned, joined, by the next
// Flush or Close, so that the caller can log it.
func (s *Store) Flush() error {
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	if s.closed {
		return errors.Join(s.takeBgErr(), fmt.Errorf("flushing quota store %s: %w", s.path, ErrClosed))
	}
	err := s.flushLocked()
	return errors.Join(s.takeBgErr(), err)
}

// takeBgErr returns the kept background error once. s.flushMu must be held.
func (s *Store) takeBgErr() error {
	err := s.bgErr
	s.bgErr = nil
	if err != nil {
		err = fmt.Errorf("background flush: %w", err)
	}
	return err
}

// pendingWrite is a dirty counter with the bytes Flush writes for it.
type pendingWrite struct {
	c    *counter
	used int64
	key  []byte
}

// flushLocked does Flush's work. s.flushMu must be held, which also makes
// it the only writer of counter.flushed and s.prunedHour.
func (s *Store) flushLocked() error {
	now := s.now()
	hour, _ := Hour.Bounds(now)
	prune := hour.Unix() != s.prunedHour
	var keepFrom [Month + 1]int64
	for p := Hour; p <= Month; p++ {
		cur, _ := p.Bounds(now)
		prev, _ := p.Bounds(cur.Add(-time.Second))
		keepFrom[p] = prev.Unix()
	}
	stale := func(k counterKey) bool { return k.period.valid() && k.start < keepFrom[k.period] }

	var writes []pendingWrite
	var staleKeys []counterKey
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.RLock()
		for k, c := range sh.m {
			if prune && stale(k) {
				staleKeys = append(staleKeys, k)
				continue
			}
			if used := c.used.Load(); used != c.flushed {
				writes = append(writes, pendingWrite{c: c, used: used, key: encodeKey(k)})
			}
		}
		sh.mu.RUnlock()
	}
	if len(writes) == 0 && !prune {
		return nil
	}

	err := s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucketName))
		if b == nil {
			return fmt.Errorf("bucket %q is missing", bucketName)
		}
		for _, w := range writes {
			if err := b.Put(w.key, binary.BigEndian.AppendUint64(nil, uint64(w.used))); err != nil {
				return fmt.Errorf("writing counter %s: %w", mustDecodeKey(w.key), err)
			}
		}
		if !prune {
			return nil
		}
		// Deleting while iterating can make a bbolt cursor skip keys, so
		// collect first. The file also holds counters that were never
		// loaded (ended before Open), hence the scan of the disk rather
		// than of staleKeys.
		var del [][]byte
		err := b.ForEach(func(k, _ []byte) error {
			if key, ok := decodeKey(k); ok && stale(key) {
				del = append(del, bytes.Clone(k))
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range del {
			if err := b.Delete(k); err != nil {
				return fmt.Errorf("deleting counter %s: %w", mustDecodeKey(k), err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("flushing quota store %s: %w", s.path, err)
	}
	for _, w := range writes {
		w.c.flushed = w.used
	}
	if prune {
		for _, k := range staleKeys {
			sh := s.shard(k.name)
			sh.mu.Lock()
			delete(sh.m, k)
			sh.mu.Unlock()
		}
		s.prunedHour = hour.Unix()
	}
	return nil
}

// OnFlush sets the function that hears the result (nil on success) of
// every background flush; the newest setting wins.
func (s *Store) OnFlush(f func(error)) { s.onFlush.Store(&f) }

// flushLoop flushes on every tick until Close.
func (s *Store) flushLoop() {
	defer close(s.done)
	for {
		select {
		case <-s.stop:
			return
		case <-s.tick:
			s.flushMu.Lock()
			// The last background result: an error that a later flush
			// got past is history (OnFlush has heard of both), and
			// Close should not report it.
			err := s.flushLocked()
			s.bgErr = err
			s.flushMu.Unlock()
			if report := s.onFlush.Load(); report != nil {
				(*report)(err)
			}
		}
	}
}

// Close stops the background flusher, flushes, and closes the file. It
// reports a kept background flush error too. Closing again does nothing.
// Take and Peek keep answering from memory after Close, but nothing they
// count reaches the disk.
func (s *Store) Close() error {
	s.flushMu.Lock()
	if s.closed {
		s.flushMu.Unlock()
		return nil
	}
	s.closed = true
	s.flushMu.Unlock()

	close(s.stop)
	<-s.done
	if s.ticker != nil {
		s.ticker.Stop()
	}

	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	err := errors.Join(s.takeBgErr(), s.flushLocked())
	if cerr := s.db.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("closing quota store %s: %w", s.path, cerr))
	}
	return err
}

// Path returns the file the store persists to, as given to Open.
func (s *Store) Path() string { return s.path }

// encodeKey returns the disk key of k: name + "\x00" + period byte +
// 8-byte big-endian Unix start. The suffix has a fixed length and
// decodeKey reads it from the end, so a name may hold any bytes, zero
// bytes included (a raw digest does).
func encodeKey(k counterKey) []byte {
	b := make([]byte, 0, len(k.name)+keySuffixLen)
	b = append(b, k.name...)
	b = append(b, 0, byte(k.period))
	return binary.BigEndian.AppendUint64(b, uint64(k.start))
}

// decodeKey parses a disk key, reporting whether it is well formed.
func decodeKey(b []byte) (counterKey, bool) {
	n := len(b) - keySuffixLen
	if n < 0 || b[n] != 0 {
		return counterKey{}, false
	}
	p := Period(b[n+1])
	if !p.valid() {
		return counterKey{}, false
	}
	return counterKey{
		name:   string(b[:n]),
		period: p,
		start:  int64(binary.BigEndian.Uint64(b[n+2:])),
	}, true
}

// mustDecodeKey is decodeKey for keys encodeKey made or decodeKey checked,
// used only to describe them in errors.
func mustDecodeKey(b []byte) counterKey {
	k, _ := decodeKey(b)
	return k
}

// String describes k in errors: its name, period kind and start. A name
// that is not printable text (a raw digest) is shown in hex.
func (k counterKey) String() string {
	name := strconv.Quote(k.name)
	if !printable(k.name) {
		name = hex.EncodeToString([]byte(k.name))
	}
	return fmt.Sprintf("%s (%s from %s)", name, k.period, time.Unix(k.start, 0).UTC().Format(time.RFC3339))
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
