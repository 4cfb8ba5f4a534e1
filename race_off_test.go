//go:build !race

package apikey

// raceEnabled is whether the race detector is on: it makes sync.Pool drop
// items at random, so allocation counts are not exact under it.
const raceEnabled = false
