package apikey

import (
	"hash/maphash"
	"iter"
	"math/bits"
)

// digestIndex finds a key set's records by digest. It is an open-addressed
// table of record pointers (linear probing, at most three-quarters full)
// with a byte of each slot's hash beside it: 9 bytes a slot, where a Go map
// from digest to record spends a 32-byte key and a pointer a slot and runs
// between half and seven-eighths full. At a million keys that is about 19
// bytes a key instead of about 100. The digest is the record's own, so
// nothing is stored twice; the hash byte spares a lookup reading the
// records whose slots it passes (a cache miss each), which it then does
// for one in 128 of them.
//
// Slots are picked by a hash of the whole digest, not by its bits: digests
// come from files and Redis, and a file of digests that share their low
// bits must not turn the table into a list. The hash is seeded per index,
// so that no file can be made against it either.
//
// It is filled once, by one goroutine, and only read after that.
type digestIndex struct {
	slots []*keyRecord // len is a power of two, or 0
	tags  []uint8      // per slot: 0 if empty, else tagOf its hash
	n     int
	seed  maphash.Seed
}

// minIndexSlots is the smallest table an index makes.
const minIndexSlots = 8

// newDigestIndex returns an index with room for n records without growing.
func newDigestIndex(n int) digestIndex {
	size := indexSlots(n)
	return digestIndex{slots: make([]*keyRecord, size), tags: make([]uint8, size), seed: maphash.MakeSeed()}
}

// indexSlots is the table size for n records: a power of two at least 4/3
// of n.
func indexSlots(n int) int {
	want := max(minIndexSlots, n+n/3+1)
	return 1 << bits.Len(uint(want-1))
}

// slot returns where the probe for d starts and its tag: the hash's low
// bits and its top seven, with the high bit set so that no tag is 0.
func (x *digestIndex) slot(d *[32]byte) (int, uint8) {
	h := maphash.Comparable(x.seed, *d)
	return int(h & uint64(len(x.slots)-1)), uint8(h>>57) | 0x80
}

// get returns the record with digest d, nil if there is none.
func (x *digestIndex) get(d *[32]byte) *keyRecord {
	if x.n == 0 {
		return nil
	}
	mask := len(x.slots) - 1
	i, tag := x.slot(d)
	for ; ; i = (i + 1) & mask {
		switch t := x.tags[i]; {
		case t == 0:
			return nil
		case t == tag && x.slots[i].digest == *d:
			return x.slots[i]
		}
	}
}

// add puts rec in the index unless a record with its digest is there
// already; then it returns that record and leaves the index as it was.
func (x *digestIndex) add(rec *keyRecord) (existing *keyRecord) {
	if (x.n+1)*4 > len(x.slots)*3 {
		if cur := x.get(&rec.digest); cur != nil {
			return cur // a duplicate needs no room
		}
		x.grow()
	}
	mask := len(x.slots) - 1
	i, tag := x.slot(&rec.digest)
	for ; ; i = (i + 1) & mask {
		switch t := x.tags[i]; {
		case t == 0:
			x.slots[i], x.tags[i] = rec, tag
			x.n++
			return nil
		case t == tag && x.slots[i].digest == rec.digest:
			return x.slots[i]
		}
	}
}

// grow doubles the table (or makes the first one).
func (x *digestIndex) grow() {
	old := x.slots
	if x.seed == (maphash.Seed{}) {
		x.seed = maphash.MakeSeed()
	}
	size := max(minIndexSlots, 2*len(old))
	x.slots, x.tags = make([]*keyRecord, size), make([]uint8, size)
	mask := size - 1
	for _, rec := range old {
		if rec == nil {
			continue
		}
		i, tag := x.slot(&rec.digest)
		for x.tags[i] != 0 {
			i = (i + 1) & mask
		}
		x.slots[i], x.tags[i] = rec, tag
	}
}

// len is the number of records.
func (x *digestIndex) len() int { return x.n }

// all yields every record with its digest, in no particular order.
func (x *digestIndex) all() iter.Seq2[[32]byte, *keyRecord] {
	return func(yield func([32]byte, *keyRecord) bool) {
		for _, rec := range x.slots {
			if rec != nil && !yield(rec.digest, rec) {
				return
			}
		}
	}
}
