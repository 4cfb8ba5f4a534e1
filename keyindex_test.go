package apikey

import (
	"crypto/sha256"
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// TestDigestIndexAgreesWithMap fills indexes, presized and grown from
// nothing, with the same random records as a Go map, duplicates included,
// and checks that they answer every lookup, present and absent, as the map
// does, and yield every record once.
func TestDigestIndexAgreesWithMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 7, 8, 100, 5000} {
		for _, presize := range []bool{true, false} {
			want := make(map[[32]byte]*keyRecord)
			var x digestIndex
			if presize {
				x = newDigestIndex(n)
			}
			var recs []*keyRecord
			for range n {
				rec := &keyRecord{}
				if len(recs) > 0 && rng.IntN(10) == 0 {
					rec.digest = recs[rng.IntN(len(recs))].digest // a duplicate
				} else {
					for i := range 4 {
						binary.LittleEndian.PutUint64(rec.digest[8*i:], rng.Uint64())
					}
				}
				recs = append(recs, rec)
				wantExisting := want[rec.digest]
				if got := x.add(rec); got != wantExisting {
					t.Fatalf("n=%d presize=%v: add returned %p, want %p", n, presize, got, wantExisting)
				}
				if wantExisting == nil {
					want[rec.digest] = rec
				}
			}
			if x.len() != len(want) {
				t.Fatalf("n=%d presize=%v: len %d, want %d", n, presize, x.len(), len(want))
			}
			if presize && len(x.slots) != indexSlots(n) {
				t.Errorf("n=%d: a presized index grew to %d slots, want %d", n, len(x.slots), indexSlots(n))
			}
			for d, rec := range want {
				if got := x.get(&d); got != rec {
					t.Fatalf("n=%d presize=%v: get = %p, want %p", n, presize, got, rec)
				}
			}
			for range 1000 {
				var d [32]byte
				binary.LittleEndian.PutUint64(d[:], rng.Uint64())
				if got := x.get(&d); got != want[d] {
					t.Fatalf("n=%d presize=%v: get of an absent digest = %p", n, presize, got)
				}
			}
			seen := make(map[[32]byte]bool)
			for d, rec := range x.all() {
				if want[d] != rec || seen[d] {
					t.Fatalf("n=%d presize=%v: all yielded %x twice or wrongly", n, presize, d[:4])
				}
				seen[d] = true
			}
			if len(seen) != len(want) {
				t.Fatalf("n=%d presize=%v: all yielded %d records, want %d", n, presize, len(seen), len(want))
			}
		}
	}
}

// TestDigestIndexDuplicateAtThreshold adds a duplicate to an index that is
// as full as it may be: it is refused, and the table does not grow for it.
func TestDigestIndexDuplicateAtThreshold(t *testing.T) {
	x := newDigestIndex(0) // 8 slots: room for 6
	var recs []*keyRecord
	for i := range 6 {
		rec := &keyRecord{}
		binary.LittleEndian.PutUint64(rec.digest[:], uint64(i)+1)
		if x.add(rec) != nil {
			t.Fatalf("record %d refused", i)
		}
		recs = append(recs, rec)
	}
	slots := len(x.slots)
	dup := &keyRecord{digest: recs[3].digest}
	if got := x.add(dup); got != recs[3] {
		t.Fatalf("add of a duplicate = %p, want the record there %p", got, recs[3])
	}
	if len(x.slots) != slots || x.len() != 6 {
		t.Fatalf("a duplicate grew the table to %d slots (from %d), len %d", len(x.slots), slots, x.len())
	}
	// A new record at the threshold does grow it.
	rec := &keyRecord{}
	binary.LittleEndian.PutUint64(rec.digest[:], 99)
	if x.add(rec) != nil || len(x.slots) != 2*slots || x.get(&recs[0].digest) != recs[0] {
		t.Fatalf("growth: %d slots, want %d", len(x.slots), 2*slots)
	}
}

// TestDigestIndexLowBitsShared fills an index with digests that agree in
// everything but their last bytes: the hash of the whole digest spreads them, so
// lookups stay short. (The test counts the longest probe run: with the
// digest's own low bits as the slot, every record would land in one run.)
func TestDigestIndexLowBitsShared(t *testing.T) {
	const n = 4096
	x := newDigestIndex(n)
	for i := range n {
		rec := &keyRecord{}
		binary.BigEndian.PutUint32(rec.digest[28:], uint32(i))
		x.add(rec)
	}
	longest, run := 0, 0
	for _, rec := range append(x.slots, x.slots...) { // runs may wrap around
		if rec == nil {
			run = 0
			continue
		}
		run++
		longest = max(longest, run)
	}
	if longest > 64 {
		t.Errorf("longest probe run %d of %d records in %d slots", longest, n, len(x.slots))
	}
	for i := range n {
		var d [32]byte
		binary.BigEndian.PutUint32(d[28:], uint32(i))
		if rec := x.get(&d); rec == nil || rec.digest != d {
			t.Fatalf("record %d not found", i)
		}
	}
}

// TestIndexSlots checks the table size: a power of two, at most
// three-quarters full at the size it was made for.
func TestIndexSlots(t *testing.T) {
	for _, n := range []int{0, 1, 5, 6, 7, 100, 1_000_000} {
		s := indexSlots(n)
		if s&(s-1) != 0 || s < minIndexSlots || n*4 > s*3 {
			t.Errorf("indexSlots(%d) = %d", n, s)
		}
	}
	if got := indexSlots(1_000_000); got != 1<<21 {
		t.Errorf("indexSlots(1M) = %d, want 2M", got)
	}
}

// BenchmarkDigestIndexGet is a lookup in a set of a million keys, present
// and absent.
func BenchmarkDigestIndexGet(b *testing.B) {
	const n = 1_000_000
	x := newDigestIndex(n)
	digests := make([][32]byte, n)
	for i := range digests {
		digests[i] = sha256.Sum256(binary.LittleEndian.AppendUint64(nil, uint64(i)))
		x.add(&keyRecord{digest: digests[i]})
	}
	b.Run("present", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if x.get(&digests[i%n]) == nil {
				b.Fatal("not found")
			}
		}
	})
	b.Run("absent", func(b *testing.B) {
		b.ReportAllocs()
		var d [32]byte
		for i := 0; b.Loop(); i++ {
			binary.LittleEndian.PutUint64(d[:], uint64(i))
			if x.get(&d) != nil {
				b.Fatal("found")
			}
		}
	})
}
