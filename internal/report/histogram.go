package report

import "math"

// The duration percentiles come from a log-scale histogram (the scheme of
// DDSketch, Masson et al., VLDB 2019): bucket i holds the values v with
// gamma^(i-1) < v <= gamma^i, and stands for 2·gamma^i/(gamma+1), which is
// within relativeError of every value in it. A percentile is the value of
// the bucket that holds the value of its rank, so it is within
// relativeError of the exact percentile (nearest rank: the value at rank
// ceil(q·n) of the n sorted values), for durations from minDuration to
// maxDuration. Durations under minDuration (0, say) count as 0.
//
// The buckets in use are kept as one dense run, from the lowest to the
// highest seen, so a group's memory does not grow with its requests: at
// most 8 bytes times the number of buckets between its fastest and its
// slowest request, about 580 for 100 µs to 10 s, and never more than
// maxBuckets (16.6 KB).
const (
	relativeError = 0.01
	minDuration   = 1e-9 // seconds: the nanosecond Caddy logs in
	maxDuration   = 1e9  // seconds
)

var (
	gamma      = (1 + relativeError) / (1 - relativeError)
	lnGamma    = math.Log(gamma)
	minIndex   = bucketIndex(minDuration)
	maxIndex   = bucketIndex(maxDuration)
	maxBuckets = maxIndex - minIndex + 1
)

// bucketIndex is the bucket of v, which must be at least minDuration.
func bucketIndex(v float64) int {
	return int(math.Ceil(math.Log(v) / lnGamma))
}

// bucketValue is the value that bucket i stands for.
func bucketValue(i int) float64 {
	return 2 * math.Exp(float64(i)*lnGamma) / (gamma + 1)
}

// histogram counts durations, in seconds, in log-scale buckets.
type histogram struct {
	counts   []uint64 // counts[j] is bucket lo+j
	lo       int
	zero     uint64 // durations under minDuration
	n        uint64
	min, max float64
}

// index returns the bucket of v, or ok false for a duration that counts
// as 0. It is worked out once per request for both of the histograms
// the request goes in.
func index(v float64) (i int, ok bool) {
	if !(v >= minDuration) { // NaN too
		return 0, false
	}
	if v > maxDuration {
		return maxIndex, true
	}
	return bucketIndex(v), true
}

// add counts v, whose bucket is i (if ok).
func (h *histogram) add(v float64, i int, ok bool) {
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if h.n == 0 || v > h.max {
		h.max = v
	}
	h.n++
	if !ok {
		h.zero++
		return
	}
	switch {
	case h.counts == nil:
		h.counts = make([]uint64, 1, 8)
		h.lo = i
	case i < h.lo:
		// Grow downwards by at least 8, so that a slow drift down does
		// not copy the run on every new bucket.
		newLo := max(min(i, h.lo-8), minIndex)
		grown := make([]uint64, h.lo-newLo+len(h.counts))
		copy(grown[h.lo-newLo:], h.counts)
		h.counts, h.lo = grown, newLo
	case i >= h.lo+len(h.counts):
		need := i - h.lo + 1
		if need > cap(h.counts) {
			grown := make([]uint64, need, min(max(need, 2*cap(h.counts)), maxIndex-h.lo+1))
			copy(grown, h.counts)
			h.counts = grown
		}
		h.counts = h.counts[:need]
	}
	h.counts[i-h.lo]++
}

// quantile returns the q-quantile (0 < q <= 1) of the durations counted,
// in seconds: see relativeError. It is 0 for an empty histogram.
func (h *histogram) quantile(q float64) float64 {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = min(max(rank, 1), h.n)
	if rank <= h.zero {
		return 0
	}
	seen := h.zero
	for j, c := range h.counts {
		seen += c
		if seen >= rank {
			// The bucket's value may lie outside what was seen; the
			// exact percentile never does.
			return min(max(bucketValue(h.lo+j), h.min), h.max)
		}
	}
	return h.max
}
