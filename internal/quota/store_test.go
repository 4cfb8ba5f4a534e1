package quota

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	bolt "go.etcd.io/bbolt"
)

// clock is a settable time source for Store; tests move it instead of
// sleeping.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(t time.Time) *clock { return &clock{t: t} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

// testLockTimeout keeps the locked-file test short; Open itself uses
// lockTimeout.
const testLockTimeout = 200 * time.Millisecond

// openTest opens a store at path whose background flusher runs only when
// the test sends on the returned channel, and closes it at the end of the
// test.
func openTest(t *testing.T, path string, clk *clock) (*Store, chan<- time.Time) {
	t.Helper()
	tick := make(chan time.Time)
	s, err := open(path, time.Hour, clk.Now, openOptions{lockTimeout: testLockTimeout, tick: tick})
	if err != nil {
		t.Fatalf("open(%s): %v", path, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, tick
}

// closeStore closes s and fails the test on error.
func closeStore(t *testing.T, s *Store) {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// diskCounts reads a closed (or copied) store file with bbolt directly, as
// "name/period/start" → count, to see what reached the disk.
func diskCounts(t *testing.T, path string) map[string]int64 {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: testLockTimeout, ReadOnly: true})
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	defer db.Close()
	got := map[string]int64{}
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucketName))
		if b == nil {
			return errors.New("no counts bucket")
		}
		return b.ForEach(func(k, v []byte) error {
			key, ok := decodeKey(k)
			if !ok || len(v) != 8 {
				return fmt.Errorf("bad entry %q = %x", k, v)
			}
			got[diskName(key.name, key.period, time.Unix(key.start, 0))] = int64(binary.BigEndian.Uint64(v))
			return nil
		})
	})
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	return got
}

func diskName(name string, p Period, start time.Time) string {
	return fmt.Sprintf("%s/%s/%s", name, p, start.UTC().Format(time.RFC3339))
}

// copyFile copies a store file as a crash would leave it: whatever the
// last committed transaction wrote.
func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// memCount returns how many counters s holds in memory.
func memCount(s *Store) int {
	n := 0
	for i := range s.shards {
		s.shards[i].mu.RLock()
		n += len(s.shards[i].m)
		s.shards[i].mu.RUnlock()
	}
	return n
}

// TestTake walks a 3/day quota through its admissions and denials at a
// clock it sets, then into the next day.
func TestTake(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	s, _ := openTest(t, filepath.Join(t.TempDir(), "q.db"), clk)
	q := Quota{Count: 3, Period: Day}
	const day = 24 * time.Hour
	steps := []struct {
		at   time.Time
		want Decision
	}{
		{date(2026, 3, 10, 12, 0, 0, 0), Decision{Allowed: true, Used: 1, Remaining: 2, Reset: 12 * time.Hour, Window: day}},
		{date(2026, 3, 10, 12, 0, 0, 0), Decision{Allowed: true, Used: 2, Remaining: 1, Reset: 12 * time.Hour, Window: day}},
		{date(2026, 3, 10, 18, 0, 0, 0), Decision{Allowed: true, Used: 3, Remaining: 0, Reset: 6 * time.Hour, Window: day}},
		{date(2026, 3, 10, 18, 0, 0, 0), Decision{Allowed: false, Used: 3, Remaining: 0, Reset: 6 * time.Hour, Window: day}},
		{date(2026, 3, 10, 23, 59, 59, 500_000_000), Decision{Allowed: false, Used: 3, Remaining: 0, Reset: 500 * time.Millisecond, Window: day}},
		{date(2026, 3, 11, 0, 0, 0, 0), Decision{Allowed: true, Used: 1, Remaining: 2, Reset: day, Window: day}},
	}
	for i, st := range steps {
		clk.Set(st.at)
		if got := s.Take("k", q); got != st.want {
			t.Fatalf("step %d at %s: Take = %+v, want %+v", i, st.at, got, st.want)
		}
	}
}

// TestTakeWindowAndReset checks Window and Reset for each period at one
// instant, which matter for the RateLimit headers.
func TestTakeWindowAndReset(t *testing.T) {
	now := date(2027, 2, 10, 6, 15, 0, 0) // a Wednesday in a 28-day February
	tests := []struct {
		p          Period
		wantReset  time.Duration
		wantWindow time.Duration
	}{
		{Hour, 45 * time.Minute, time.Hour},
		{Day, 17*time.Hour + 45*time.Minute, 24 * time.Hour},
		{Week, 4*24*time.Hour + 17*time.Hour + 45*time.Minute, 7 * 24 * time.Hour},
		{Month, 18*24*time.Hour + 17*time.Hour + 45*time.Minute, 28 * 24 * time.Hour},
	}
	s, _ := openTest(t, filepath.Join(t.TempDir(), "q.db"), newClock(now))
	for _, tt := range tests {
		t.Run(tt.p.String(), func(t *testing.T) {
			d := s.Take("k", Quota{Count: 10, Period: tt.p})
			if d.Reset != tt.wantReset || d.Window != tt.wantWindow {
				t.Fatalf("Take = %+v, want Reset %s and Window %s", d, tt.wantReset, tt.wantWindow)
			}
		})
	}
}

// TestTakeCounters checks what shares a counter: the same name and period
// kind do, whatever the Count; other names and kinds do not.
func TestTakeCounters(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	s, _ := openTest(t, filepath.Join(t.TempDir(), "q.db"), clk)
	steps := []struct {
		name     string
		q        Quota
		wantUsed int64
		wantOK   bool
	}{
		{"a", Quota{5, Day}, 1, true},
		{"a", Quota{5, Day}, 2, true},
		{"b", Quota{5, Day}, 1, true},
		{"a", Quota{5, Hour}, 1, true},
		{"a", Quota{5, Week}, 1, true},
		{"a", Quota{5, Month}, 1, true},
		{"a", Quota{3, Day}, 3, true},       // lowered Count keeps the used count
		{"a", Quota{2, Day}, 3, false},      // lowered below the used count: denied, Remaining 0
		{"a", Quota{100, Day}, 4, true},     // raised: admits again from where it was
		{"a", Quota{}, 0, true},             // no quota: admits, counts nothing
		{"a", Quota{5, Period(9)}, 0, true}, // unknown period: same
		{"a", Quota{100, Day}, 5, true},
	}
	for i, st := range steps {
		d := s.Take(st.name, st.q)
		if d.Used != st.wantUsed || d.Allowed != st.wantOK || d.Remaining < 0 {
			t.Fatalf("step %d: Take(%q, %s) = %+v, want Used %d, Allowed %t", i, st.name, st.q, d, st.wantUsed, st.wantOK)
		}
	}
}

// TestTakeNewPeriod checks that every period kind starts from zero at its
// boundary and not before.
func TestTakeNewPeriod(t *testing.T) {
	tests := []struct {
		p        Period
		last     time.Time // the last instant of a period
		boundary time.Time
	}{
		{Hour, date(2026, 3, 10, 12, 59, 59, 999999999), date(2026, 3, 10, 13, 0, 0, 0)},
		{Day, date(2026, 3, 10, 23, 59, 59, 999999999), date(2026, 3, 11, 0, 0, 0, 0)},
		{Week, date(2027, 1, 3, 23, 59, 59, 999999999), date(2027, 1, 4, 0, 0, 0, 0)},
		{Month, date(2028, 2, 29, 23, 59, 59, 999999999), date(2028, 3, 1, 0, 0, 0, 0)},
	}
	for _, tt := range tests {
		t.Run(tt.p.String(), func(t *testing.T) {
			clk := newClock(tt.last.Add(-time.Minute))
			s, _ := openTest(t, filepath.Join(t.TempDir(), "q.db"), clk)
			q := Quota{Count: 2, Period: tt.p}
			s.Take("k", q)
			s.Take("k", q)
			clk.Set(tt.last)
			if d := s.Take("k", q); d.Allowed || d.Used != 2 {
				t.Fatalf("Take at %s = %+v, want denied with Used 2", tt.last, d)
			}
			clk.Set(tt.boundary)
			if d := s.Peek("k", q); !d.Allowed || d.Used != 0 || d.Remaining != 2 {
				t.Fatalf("Peek at %s = %+v, want a fresh period", tt.boundary, d)
			}
			if d := s.Take("k", q); !d.Allowed || d.Used != 1 {
				t.Fatalf("Take at %s = %+v, want admitted with Used 1", tt.boundary, d)
			}
		})
	}
}

func TestPeek(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	s, _ := openTest(t, filepath.Join(t.TempDir(), "q.db"), clk)
	q := Quota{Count: 2, Period: Day}
	if d := s.Peek("k", q); d != (Decision{Allowed: true, Used: 0, Remaining: 2, Reset: 12 * time.Hour, Window: 24 * time.Hour}) {
		t.Fatalf("Peek on an unknown name = %+v", d)
	}
	if n := memCount(s); n != 0 {
		t.Fatalf("Peek created %d counters, want none", n)
	}
	s.Take("k", q)
	for range 3 {
		if d := s.Peek("k", q); !d.Allowed || d.Used != 1 || d.Remaining != 1 {
			t.Fatalf("Peek after one Take = %+v, want Used 1, Remaining 1", d)
		}
	}
	s.Take("k", q)
	if d := s.Peek("k", q); d.Allowed || d.Used != 2 || d.Remaining != 0 {
		t.Fatalf("Peek after two Takes = %+v, want not allowed, Used 2", d)
	}
}

// TestTakeConcurrent checks exactness under contention: 100 goroutines
// take until they are denied, and however they interleave, the quota
// admits exactly Count requests, each admission seeing a different Used.
// The first case is the brief's: 100 goroutines, a 10/day quota. Run it
// with -race.
func TestTakeConcurrent(t *testing.T) {
	tests := []struct {
		count  int64
		rounds int
	}{
		{10, 50},
		{1000, 10},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.count), func(t *testing.T) {
			clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
			s, _ := openTest(t, filepath.Join(t.TempDir(), "q.db"), clk)
			q := Quota{Count: tt.count, Period: Day}
			for round := range tt.rounds {
				name := fmt.Sprintf("k%d", round)
				seen := make([]atomic.Int32, tt.count+1) // seen[u]: admissions that reported Used u
				var admitted, denied atomic.Int64
				var wg sync.WaitGroup
				start := make(chan struct{})
				for range 100 {
					wg.Go(func() {
						<-start
						for {
							d := s.Take(name, q)
							if !d.Allowed {
								denied.Add(1)
								return
							}
							admitted.Add(1)
							if d.Used >= 1 && d.Used <= tt.count {
								seen[d.Used].Add(1)
							}
						}
					})
				}
				close(start)
				wg.Wait()
				if n := admitted.Load(); n != tt.count {
					t.Fatalf("round %d: %d admitted, want %d", round, n, tt.count)
				}
				for u := int64(1); u <= tt.count; u++ {
					if n := seen[u].Load(); n != 1 {
						t.Fatalf("round %d: %d admissions reported Used %d, want 1", round, n, u)
					}
				}
				if d := s.Peek(name, q); d.Used != tt.count || d.Allowed {
					t.Fatalf("round %d: Peek = %+v, want Used %d, not allowed", round, d, tt.count)
				}
			}
		})
	}
}

// TestTakeAllocs checks that a request for a key whose counter exists does
// not allocate: Take runs on every request.
func TestTakeAllocs(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	s, _ := openTest(t, filepath.Join(t.TempDir(), "q.db"), clk)
	name := strings.Repeat("\xab", 32) // a raw SHA-256 digest, as the handler passes
	q := Quota{Count: MaxCount, Period: Month}
	s.Take(name, q)
	if n := testing.AllocsPerRun(1000, func() { s.Take(name, q) }); n != 0 {
		t.Errorf("Take on a warm counter: %v allocations, want 0", n)
	}
	if n := testing.AllocsPerRun(1000, func() { s.Peek(name, q) }); n != 0 {
		t.Errorf("Peek: %v allocations, want 0", n)
	}
}

// TestPersistAcrossClose checks that a clean Close and reopen keeps the
// counts exactly and that counting continues from them.
func TestPersistAcrossClose(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	path := filepath.Join(t.TempDir(), "q.db")
	day := Quota{Count: 10, Period: Day}
	month := Quota{Count: 100, Period: Month}

	s, _ := openTest(t, path, clk)
	for range 7 {
		s.Take("a", day)
	}
	for range 4 {
		s.Take("a", month)
	}
	for range 12 {
		s.Take("b", day) // 10 admitted, 2 denied
	}
	closeStore(t, s)

	s, _ = openTest(t, path, clk)
	checks := []struct {
		name string
		q    Quota
		want int64
	}{
		{"a", day, 7},
		{"a", month, 4},
		{"b", day, 10},
		{"c", day, 0},
	}
	for _, c := range checks {
		if d := s.Peek(c.name, c.q); d.Used != c.want {
			t.Errorf("after reopen: Peek(%q, %s) = %+v, want Used %d", c.name, c.q, d, c.want)
		}
	}
	if d := s.Take("a", day); !d.Allowed || d.Used != 8 {
		t.Errorf("after reopen: Take(a, %s) = %+v, want admitted with Used 8", day, d)
	}
	if d := s.Take("b", day); d.Allowed || d.Used != 10 {
		t.Errorf("after reopen: Take(b, %s) = %+v, want denied with Used 10", day, d)
	}
	closeStore(t, s)

	s, _ = openTest(t, path, clk)
	if d := s.Peek("a", day); d.Used != 8 {
		t.Errorf("after second reopen: Peek(a, %s) = %+v, want Used 8", day, d)
	}
}

// TestRawDigestName checks names as the handler passes them: a view of a
// raw SHA-256 digest's bytes, zero bytes included. The counter must keep
// its own copy of the name, and the name must survive the disk key.
func TestRawDigestName(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	path := filepath.Join(t.TempDir(), "q.db")
	q := Quota{Count: 10, Period: Day}
	digest := sha256.Sum256([]byte("key 1"))
	digest[0], digest[31] = 0, 0 // zero bytes at both ends of the name
	orig := string(digest[:])
	view := unsafe.String(&digest[0], len(digest))

	s, _ := openTest(t, path, clk)
	for range 3 {
		s.Take(view, q)
	}
	digest[5] ^= 0xff // the caller reuses its memory
	if d := s.Peek(orig, q); d.Used != 3 {
		t.Fatalf("Peek after the caller's bytes changed = %+v, want Used 3", d)
	}
	closeStore(t, s)

	s, _ = openTest(t, path, clk)
	if d := s.Peek(orig, q); d.Used != 3 {
		t.Fatalf("Peek after reopen = %+v, want Used 3", d)
	}
	if d := s.Peek(view, q); d.Used != 0 {
		t.Fatalf("Peek of another digest after reopen = %+v, want Used 0", d)
	}
}

// TestFlushSurvivesCrash checks the crash case: what a Flush wrote is in the
// file even though the store was never closed, and what came after is not.
func TestFlushSurvivesCrash(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	dir := t.TempDir()
	path := filepath.Join(dir, "q.db")
	q := Quota{Count: 100, Period: Day}
	s, _ := openTest(t, path, clk)
	for range 5 {
		s.Take("k", q)
	}
	if err := s.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	s.Take("k", q) // lost in the crash
	crashed := filepath.Join(dir, "crashed.db")
	copyFile(t, path, crashed)

	s2, _ := openTest(t, crashed, clk)
	if d := s2.Peek("k", q); d.Used != 5 {
		t.Fatalf("after crash: Peek = %+v, want Used 5", d)
	}
}

// TestBackgroundFlush checks that the flusher goroutine writes on its tick,
// with no Flush or Close, and that a real ticker drives it in Open.
func TestBackgroundFlush(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	dir := t.TempDir()
	path := filepath.Join(dir, "q.db")
	q := Quota{Count: 100, Period: Day}

	t.Run("tick", func(t *testing.T) {
		s, tick := openTest(t, path, clk)
		s.Take("k", q)
		s.Take("k", q)
		// The second send is received only after the first flush is done.
		tick <- time.Time{}
		tick <- time.Time{}
		crashed := filepath.Join(dir, "crashed.db")
		copyFile(t, path, crashed)
		if got := diskCounts(t, crashed)[diskName("k", Day, date(2026, 3, 10, 0, 0, 0, 0))]; got != 2 {
			t.Fatalf("on disk after a background flush: %d, want 2", got)
		}
	})

	t.Run("ticker", func(t *testing.T) {
		path := filepath.Join(dir, "ticker.db")
		s, err := Open(path, time.Millisecond, clk.Now)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		s.Take("k", q)
		// Wait for the flusher (not for a fixed time): the count is
		// clean once it has run.
		deadline := time.Now().Add(10 * time.Second)
		for dirtyCount(s) != 0 {
			if time.Now().After(deadline) {
				t.Fatal("the background flusher did not flush within 10s")
			}
			time.Sleep(time.Millisecond)
		}
	})
}

// dirtyCount returns how many counters of s are not yet on disk.
func dirtyCount(s *Store) int {
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.RLock()
		for _, c := range sh.m {
			if c.used.Load() != c.flushed {
				n++
			}
		}
		sh.mu.RUnlock()
	}
	return n
}

// failingUpdate makes s's flushes fail until the returned function is
// called.
func failingUpdate(t *testing.T, s *Store, err error) (restore func()) {
	t.Helper()
	s.flushMu.Lock()
	orig := s.update
	s.update = func(func(*bolt.Tx) error) error { return err }
	s.flushMu.Unlock()
	return func() {
		s.flushMu.Lock()
		s.update = orig
		s.flushMu.Unlock()
	}
}

// TestFlushError checks that a failed flush is reported, by Flush itself or,
// for the background flusher, by the next Flush or Close, and that the
// counters stay dirty so that a later flush writes them.
func TestFlushError(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	q := Quota{Count: 100, Period: Day}
	diskFull := errors.New("disk full")

	t.Run("Flush", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "q.db")
		s, _ := openTest(t, path, clk)
		s.Take("k", q)
		restore := failingUpdate(t, s, diskFull)
		err := s.Flush()
		if !errors.Is(err, diskFull) || !strings.Contains(err.Error(), "flushing quota store "+path) {
			t.Fatalf("Flush = %v, want the disk error naming the file", err)
		}
		s.Take("k", q)
		restore()
		if err := s.Flush(); err != nil {
			t.Fatalf("Flush after recovery: %v", err)
		}
		closeStore(t, s)
		if got := diskCounts(t, path)[diskName("k", Day, date(2026, 3, 10, 0, 0, 0, 0))]; got != 2 {
			t.Fatalf("on disk after the retry: %d, want 2", got)
		}
	})

	t.Run("background then Flush", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "q.db")
		s, tick := openTest(t, path, clk)
		s.Take("k", q)
		restore := failingUpdate(t, s, diskFull)
		tick <- time.Time{}
		tick <- time.Time{}
		restore()
		err := s.Flush()
		if !errors.Is(err, diskFull) || !strings.Contains(err.Error(), "background flush") {
			t.Fatalf("Flush after a failed background flush = %v, want the kept error", err)
		}
		if err := s.Flush(); err != nil {
			t.Fatalf("second Flush = %v, want the kept error reported only once", err)
		}
		closeStore(t, s)
		if got := diskCounts(t, path)[diskName("k", Day, date(2026, 3, 10, 0, 0, 0, 0))]; got != 1 {
			t.Fatalf("on disk after the retry: %d, want 1", got)
		}
	})

	t.Run("background then Close", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "q.db")
		s, tick := openTest(t, path, clk)
		s.Take("k", q)
		heard := make(chan error, 1)
		s.OnFlush(func(err error) { heard <- err })
		restore := failingUpdate(t, s, diskFull)
		tick <- time.Time{}
		if err := <-heard; err == nil {
			t.Fatal("the background flush did not fail")
		}
		restore()
		if err := s.Close(); !errors.Is(err, diskFull) {
			t.Fatalf("Close after a failed background flush = %v, want the kept error", err)
		}
		if got := diskCounts(t, path)[diskName("k", Day, date(2026, 3, 10, 0, 0, 0, 0))]; got != 1 {
			t.Fatalf("on disk after Close: %d, want 1", got)
		}
	})
}

// A background flush error that a later background flush got past is not
// reported by Close: OnFlush heard of both, and the counts are on disk.
func TestFlushErrorThenRecovery(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	path := filepath.Join(t.TempDir(), "q.db")
	s, tick := openTest(t, path, clk)
	s.Take("k", Quota{Count: 10, Period: Day})
	heard := make(chan error, 1)
	s.OnFlush(func(err error) { heard <- err })
	restore := failingUpdate(t, s, errors.New("disk full"))
	tick <- time.Time{}
	if err := <-heard; err == nil {
		t.Fatal("the background flush did not fail")
	}
	restore()
	tick <- time.Time{}
	if err := <-heard; err != nil {
		t.Fatalf("the background flush after recovery: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close after the disk recovered = %v, want nil", err)
	}
	if got := diskCounts(t, path)[diskName("k", Day, date(2026, 3, 10, 0, 0, 0, 0))]; got != 1 {
		t.Fatalf("on disk: %d, want 1", got)
	}
}

// TestClose checks that Close is idempotent and that a closed store still
// answers from memory but persists nothing.
func TestClose(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	path := filepath.Join(t.TempDir(), "q.db")
	q := Quota{Count: 2, Period: Day}
	s, _ := openTest(t, path, clk)
	s.Take("k", q)
	closeStore(t, s)
	if err := s.Close(); err != nil {
		t.Fatalf("second Close = %v, want nil", err)
	}
	if d := s.Take("k", q); !d.Allowed || d.Used != 2 {
		t.Fatalf("Take after Close = %+v, want admitted with Used 2", d)
	}
	if d := s.Take("k", q); d.Allowed {
		t.Fatalf("Take after Close = %+v, want denied", d)
	}
	if err := s.Flush(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Flush after Close = %v, want ErrClosed", err)
	}
	if got := diskCounts(t, path)[diskName("k", Day, date(2026, 3, 10, 0, 0, 0, 0))]; got != 1 {
		t.Fatalf("on disk: %d, want the 1 taken before Close", got)
	}
	if s.Path() != path {
		t.Errorf("Path() = %q, want %q", s.Path(), path)
	}
}

// TestFlushPrunes checks that Flush keeps the current and the previous
// period of each kind and deletes older ones from memory and disk.
func TestFlushPrunes(t *testing.T) {
	t0 := date(2026, 3, 10, 12, 30, 0, 0) // Tuesday
	clk := newClock(t0)
	path := filepath.Join(t.TempDir(), "q.db")
	periods := []Period{Hour, Day, Week, Month}

	// For every kind, a counter in the period of t0 ("old"), in the next
	// ("prev") and in the one after ("cur"), as a clock in the "cur" period
	// sees them.
	instants := []struct {
		name string
		at   func(p Period) time.Time
	}{
		{"old", func(Period) time.Time { return t0 }},
		{"prev", func(p Period) time.Time { _, end := p.Bounds(t0); return end }},
		{"cur", func(p Period) time.Time { _, end := p.Bounds(t0); _, end2 := p.Bounds(end); return end2 }},
	}
	s, _ := openTest(t, path, clk)
	for _, in := range instants {
		for _, p := range periods {
			clk.Set(in.at(p))
			s.Take(in.name, Quota{Count: 10, Period: p})
		}
	}
	clk.Set(t0)
	if err := s.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if n := memCount(s); n != 12 {
		t.Fatalf("%d counters in memory before pruning, want 12", n)
	}

	// Each step moves the clock into the "cur" period of one kind, later
	// every time, so the steps must run in order.
	steps := []struct {
		p   Period
		now time.Time
	}{
		{Hour, date(2026, 3, 10, 14, 30, 0, 0)},
		{Day, date(2026, 3, 12, 0, 0, 0, 0)},
		{Week, date(2026, 3, 23, 0, 0, 0, 0)},
		{Month, date(2026, 5, 1, 0, 0, 0, 0)},
	}
	for _, st := range steps {
		clk.Set(st.now)
		if err := s.Flush(); err != nil {
			t.Fatalf("Flush at %s: %v", st.now, err)
		}
		copied := filepath.Join(t.TempDir(), "copy.db")
		copyFile(t, path, copied)
		disk := diskCounts(t, copied)
		for _, in := range instants {
			start, _ := st.p.Bounds(in.at(st.p))
			key := counterKey{name: in.name, period: st.p, start: start.Unix()}
			sh := s.shard(key.name)
			sh.mu.RLock()
			_, inMem := sh.m[key]
			sh.mu.RUnlock()
			_, onDisk := disk[diskName(in.name, st.p, start)]
			want := in.name != "old"
			if inMem != want || onDisk != want {
				t.Errorf("at %s: %s counter from %s: in memory %t, on disk %t; want %t",
					st.now, st.p, start, inMem, onDisk, want)
			}
		}
	}
}

// TestFlushPrunesUnloaded checks that pruning also finds counters that are
// only on disk: Open does not load periods that have ended.
func TestFlushPrunesUnloaded(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 30, 0, 0))
	path := filepath.Join(t.TempDir(), "q.db")
	s, _ := openTest(t, path, clk)
	for _, p := range []Period{Hour, Day, Week, Month} {
		s.Take("k", Quota{Count: 10, Period: p})
	}
	closeStore(t, s)
	if n := len(diskCounts(t, path)); n != 4 {
		t.Fatalf("%d counters on disk, want 4", n)
	}

	clk.Set(date(2026, 6, 1, 0, 0, 0, 0))
	s, _ = openTest(t, path, clk)
	if n := memCount(s); n != 0 {
		t.Fatalf("%d counters loaded from ended periods, want 0", n)
	}
	closeStore(t, s) // Close flushes, and the first flush prunes
	if got := diskCounts(t, path); len(got) != 0 {
		t.Fatalf("on disk after pruning: %v, want nothing", got)
	}
}

// TestOpenErrors checks that a file Open cannot use is an error naming it,
// never an empty store.
func TestOpenErrors(t *testing.T) {
	// withBolt makes a bbolt file and lets fn fill it.
	withBolt := func(fn func(tx *bolt.Tx) error) func(t *testing.T, path string) {
		return func(t *testing.T, path string) {
			t.Helper()
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(fn); err != nil {
				t.Fatal(err)
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
	good := encodeKey(counterKey{name: "k", period: Day, start: date(2026, 3, 10, 0, 0, 0, 0).Unix()})
	tests := []struct {
		name    string
		setup   func(t *testing.T, path string)
		wantErr string
	}{
		{"garbage", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("this is not a bbolt file"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, "opening quota store %s: invalid database"},
		{"garbage over a page", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte(strings.Repeat("garbage!", 4096)), 0o600); err != nil {
				t.Fatal(err)
			}
		}, "opening quota store %s: invalid database"},
		{"damaged page", func(t *testing.T, path string) {
			withBolt(func(tx *bolt.Tx) error {
				b, err := tx.CreateBucket([]byte(bucketName))
				if err != nil {
					return err
				}
				return b.Put(good, make([]byte, 8))
			})(t, path)
			// Overwrite all but the first three pages: the meta pages
			// survive, so bbolt takes the file, but the freelist and
			// pages they point to (written after the first three by
			// copy-on-write) are junk.
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			info, err := f.Stat()
			if err != nil {
				t.Fatal(err)
			}
			pageSize := int64(os.Getpagesize())
			junk := []byte(strings.Repeat("\xff", int(info.Size()-3*pageSize)))
			if _, err := f.WriteAt(junk, 3*pageSize); err != nil {
				t.Fatal(err)
			}
		}, "quota store %s: "},
		{"damaged bucket page", func(t *testing.T, path string) {
			withBolt(func(tx *bolt.Tx) error {
				b, err := tx.CreateBucket([]byte(bucketName))
				if err != nil {
					return err
				}
				return b.Put(good, make([]byte, 8))
			})(t, path)
			// Break the page type of the page holding the counter,
			// which Open itself does not read.
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			at := strings.Index(string(data), string(good))
			if at < 0 {
				t.Fatal("counter key not found in the file")
			}
			page := at - at%os.Getpagesize()
			data[page+8], data[page+9] = 0xff, 0xff // page flags
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "reading quota store %s: damaged file: "},
		{"wrong-size value", withBolt(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte(bucketName))
			if err != nil {
				return err
			}
			return b.Put(good, []byte{0, 0, 0, 7})
		}), "reading quota store %s: counter \"k\" (day from 2026-03-10T00:00:00Z): value is 4 bytes, want 8"},
		{"count out of range", withBolt(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte(bucketName))
			if err != nil {
				return err
			}
			return b.Put(good, []byte{0xff, 0, 0, 0, 0, 0, 0, 0})
		}), "reading quota store %s: counter \"k\" (day from 2026-03-10T00:00:00Z): count 18374686479671623680 out of range"},
		{"malformed key", withBolt(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte(bucketName))
			if err != nil {
				return err
			}
			return b.Put([]byte("short"), make([]byte, 8))
		}), "reading quota store %s: malformed key \"short\""},
		{"unknown period", withBolt(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte(bucketName))
			if err != nil {
				return err
			}
			k := encodeKey(counterKey{name: "k", period: 7})
			return b.Put(k, make([]byte, 8))
		}), "reading quota store %s: malformed key"},
		{"nested bucket", withBolt(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucket([]byte(bucketName))
			if err != nil {
				return err
			}
			_, err = b.CreateBucket(good)
			return err
		}), "reading quota store %s: counter \"k\" (day from 2026-03-10T00:00:00Z): a bucket, want an 8-byte count"},
		{"another program's file", withBolt(func(tx *bolt.Tx) error {
			_, err := tx.CreateBucket([]byte("users"))
			return err
		}), "reading quota store %s: not a quota store: it holds bucket \"users\""},
		{"a directory", func(t *testing.T, path string) {
			if err := os.Mkdir(path, 0o700); err != nil {
				t.Fatal(err)
			}
		}, "opening quota store %s: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "quotas.db")
			tt.setup(t, path)
			before, _ := os.ReadFile(path)
			s, err := open(path, time.Hour, nil, openOptions{lockTimeout: testLockTimeout})
			if err == nil {
				s.Close()
				t.Fatal("open succeeded, want an error")
			}
			t.Logf("open error: %v", err)
			if want := fmt.Sprintf(tt.wantErr, path); !strings.Contains(err.Error(), want) {
				t.Fatalf("open error = %q, want it to contain %q", err, want)
			}
			if after, _ := os.ReadFile(path); string(after) != string(before) {
				t.Error("a failed open changed the file")
			}
			// A failed open must not leave the file locked, or the
			// next attempt would report a lock instead of the damage.
			s2, err2 := open(path, time.Hour, nil, openOptions{lockTimeout: testLockTimeout})
			if err2 == nil {
				s2.Close()
			}
			if err2 == nil || strings.Contains(err2.Error(), "locked") {
				t.Errorf("second open error = %v, want the same damage reported again", err2)
			}
		})
	}
}

// TestOpenCreates checks that Open makes missing parent directories and the
// file, readable by the owner only, and that the file is a valid empty
// store.
func TestOpenCreates(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "caddy")
	path := filepath.Join(dir, "quotas.db")
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	s, err := Open(path, time.Hour, clk.Now)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	closeStore(t, s)
	perms := []struct {
		path string
		want os.FileMode
	}{
		{dir, 0o700 | os.ModeDir},
		{filepath.Dir(dir), 0o700 | os.ModeDir},
		{path, 0o600},
	}
	for _, p := range perms {
		info, err := os.Stat(p.path)
		if err != nil {
			t.Fatal(err)
		}
		// The umask can only take permissions away.
		if got := info.Mode(); got&^p.want != 0 || got.IsDir() != p.want.IsDir() {
			t.Errorf("%s: mode %s, want at most %s", p.path, got, p.want)
		}
	}
	if got := diskCounts(t, path); len(got) != 0 {
		t.Errorf("new store holds %v, want nothing", got)
	}
}

// TestOpenLocked checks that a file another store holds is an error within
// the lock timeout, not a hang, and names the file.
func TestOpenLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "quotas.db")
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	openTest(t, path, clk)

	type result struct {
		s   *Store
		err error
	}
	done := make(chan result, 1)
	go func() {
		s, err := open(path, time.Hour, clk.Now, openOptions{lockTimeout: testLockTimeout})
		done <- result{s, err}
	}()
	select {
	case r := <-done:
		if r.err == nil {
			r.s.Close()
			t.Fatal("second open of a locked file succeeded")
		}
		want := "quota store " + path + ": locked by another process?"
		if !strings.Contains(r.err.Error(), want) {
			t.Fatalf("second open error = %q, want it to contain %q", r.err, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("second open still waiting after 10s with a lock timeout of %s", testLockTimeout)
	}
}

// TestKeyEncoding checks the disk key layout other tools may read, and that
// it decodes back.
func TestKeyEncoding(t *testing.T) {
	k := counterKey{name: "ab01", period: Week, start: date(2026, 3, 9, 0, 0, 0, 0).Unix()}
	want := append([]byte("ab01\x00\x03"), 0, 0, 0, 0, 0x69, 0xae, 0x0d, 0x80)
	got := encodeKey(k)
	if string(got) != string(want) {
		t.Fatalf("encodeKey(%v) = %x, want %x", k, got, want)
	}
	if back, ok := decodeKey(got); !ok || back != k {
		t.Fatalf("decodeKey(%x) = %v, %t; want %v", got, back, ok, k)
	}
	raw := counterKey{name: "\x00\xab", period: Day, start: date(2026, 3, 10, 0, 0, 0, 0).Unix()}
	if got, want := raw.String(), "00ab (day from 2026-03-10T00:00:00Z)"; got != want {
		t.Errorf("String of a raw name = %q, want %q", got, want)
	}
	if back, ok := decodeKey(encodeKey(raw)); !ok || back != raw {
		t.Errorf("decodeKey(encodeKey(%v)) = %v, %t", raw, back, ok)
	}
	bad := [][]byte{nil, []byte("ab01"), append([]byte("ab01\x01\x03"), make([]byte, 8)...), append([]byte("ab01\x00\x00"), make([]byte, 8)...)}
	for _, b := range bad {
		if k, ok := decodeKey(b); ok {
			t.Errorf("decodeKey(%x) = %v, want malformed", b, k)
		}
	}
}

func BenchmarkTake(b *testing.B) {
	s, err := Open(filepath.Join(b.TempDir(), "q.db"), time.Second, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	name := strings.Repeat("\xab", 32) // a raw SHA-256 digest, as the handler passes
	q := Quota{Count: MaxCount, Period: Month}

	// The clock read alone, so that Take can be quoted as a ratio to it
	// measured in the same run.
	b.Run("baseline/time.Now", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = time.Now()
		}
	})
	b.Run("warm", func(b *testing.B) {
		s.Take(name, q)
		b.ReportAllocs()
		for b.Loop() {
			s.Take(name, q)
		}
	})
	b.Run("parallel/one key", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				s.Take(name, q)
			}
		})
	})
	b.Run("parallel/key per goroutine", func(b *testing.B) {
		var id atomic.Int64
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			name := fmt.Sprintf("%032d", id.Add(1))
			for pb.Next() {
				s.Take(name, q)
			}
		})
	})
}

// OnFlush hears each background flush as it happens: the error while the
// disk fails, nil once it works again.
func TestOnFlush(t *testing.T) {
	clk := newClock(date(2026, 3, 10, 12, 0, 0, 0))
	s, tick := openTest(t, filepath.Join(t.TempDir(), "q.db"), clk)
	heard := make(chan error, 4)
	s.OnFlush(func(err error) { heard <- err })
	s.Take("k", Quota{Count: 10, Period: Day})

	restore := failingUpdate(t, s, errors.New("disk full"))
	tick <- time.Time{}
	if err := <-heard; err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("heard %v, want the flush error", err)
	}
	restore()
	tick <- time.Time{}
	if err := <-heard; err != nil {
		t.Fatalf("heard %v after the disk recovered, want nil", err)
	}
}
