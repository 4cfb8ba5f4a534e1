// Package ratelimit holds the rate arithmetic of the api_key handler: parsing
// "<count>/<duration>" rates and the generic cell rate algorithm (GCRA) that
// decides each request. It keeps one int64 of state per key, whatever the
// limit, and knows nothing of Caddy.
package ratelimit

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// MaxCount is the largest count a rate may have. It keeps the arithmetic of
// Decide far from int64 overflow.
const MaxCount = 1_000_000_000

// Limit is a rate limit: Count requests per Period, with bursts of up to
// Burst requests at once. The zero Limit is "no limit".
type Limit struct {
	Count  int64
	Period time.Duration
	Burst  int64
}

// IsZero reports whether l limits nothing.
func (l Limit) IsZero() bool { return l.Count == 0 }

// Interval is the time one request's worth of allowance takes to come back.
func (l Limit) Interval() time.Duration {
	if l.Count == 0 {
		return 0
	}
	return l.Period / time.Duration(l.Count)
}

// ParseRate parses "<count>/<duration>", for example "600/1m", "10/s" or
// "5000/1h". The duration takes the units ms, s, m, h and d (days), as in
// "1h30m" or "1.5s", and is at least 1ms; a bare unit means one of it. The
// burst of the result is its count.
func ParseRate(s string) (Limit, error) {
	countStr, durStr, ok := strings.Cut(s, "/")
	if !ok {
		return Limit{}, fmt.Errorf("rate %q: want <count>/<duration>, such as 600/1m", s)
	}
	count, err := strconv.ParseInt(countStr, 10, 64)
	if err != nil || count <= 0 || count > MaxCount {
		return Limit{}, fmt.Errorf("rate %q: count must be a whole number from 1 to %d", s, MaxCount)
	}
	if durStr != "" && !strings.ContainsAny(durStr, "0123456789") {
		durStr = "1" + durStr // "10/s" is ten a second
	}
	// time.ParseDuration also reads ns, us and µs; the documented units stop
	// at ms, which is as fine as a period needs to be ("1/1ns" read as
	// a billion requests a second).
	if strings.Contains(durStr, "ns") || strings.Contains(durStr, "us") ||
		strings.Contains(durStr, "µs") || strings.Contains(durStr, "μs") {
		return Limit{}, fmt.Errorf("rate %q: duration units must be ms, s, m, h or d", s)
	}
	period, err := parseDuration(durStr)
	if err != nil {
		return Limit{}, fmt.Errorf("rate %q: %w", s, err)
	}
	if period <= 0 {
		return Limit{}, fmt.Errorf("rate %q: duration must be positive", s)
	}
	if period < time.Millisecond {
		return Limit{}, fmt.Errorf("rate %q: duration must be at least 1ms", s)
	}
	if period > 366*24*time.Hour {
		return Limit{}, fmt.Errorf("rate %q: duration must be at most 366d", s)
	}
	if period/time.Duration(count) <= 0 {
		return Limit{}, fmt.Errorf("rate %q: more than one request per nanosecond", s)
	}
	return Limit{Count: count, Period: period, Burst: count}, nil
}

// parseDuration is time.ParseDuration with a "d" (24h) unit in front, as in
// caddy.ParseDuration, without importing Caddy.
func parseDuration(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok && days != "" && !strings.ContainsAny(days, "hmsuµn") {
		n, err := strconv.ParseFloat(days, 64)
		if err != nil || n < 0 || n > 366 {
			return 0, fmt.Errorf("invalid duration %q", s)
		}
		return time.Duration(n * float64(24*time.Hour)), nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("invalid duration %q", s)
	}
	return d, nil
}

// ValidateBurst checks a burst read from a config.
func ValidateBurst(b int64) error {
	if b <= 0 || b > MaxCount {
		return errors.New("burst must be a whole number from 1 to " + strconv.Itoa(MaxCount))
	}
	return nil
}

// Decision is the outcome of one request against a limit.
type Decision struct {
	// Allowed says whether the request may go on.
	Allowed bool
	// Remaining is how many more requests would be allowed right now.
	Remaining int64
	// Reset is how long until the full burst is available again.
	Reset time.Duration
	// RetryAfter is how long until the next request would be allowed; zero
	// when Allowed.
	RetryAfter time.Duration
}

// Decide applies one request at time now (nanoseconds on any monotonic
// scale) to a key whose theoretical arrival time is tat, and returns the
// new tat to store with the decision. A tat of zero is a key never seen.
//
// GCRA: each request pushes tat one interval into the future; a request is
// allowed while tat stays within burst intervals of now.
func (l Limit) Decide(tat, now int64) (int64, Decision) {
	return l.GCRA().Decide(tat, now)
}

// GCRA is a Limit's arithmetic, worked out once: the time one request's
// allowance takes to come back and the window a burst spans. Deciding with
// it spares a request two of Decide's three divisions.
type GCRA struct {
	interval int64
	window   int64
}

// GCRA works out l's arithmetic. l must not be zero.
func (l Limit) GCRA() GCRA {
	interval := int64(l.Interval())
	// The window is burst intervals, capped far beyond any real limit
	// (146 years) so that a huge burst cannot overflow it.
	window := int64(1) << 62
	if l.Burst < window/interval {
		window = interval * l.Burst
	}
	return GCRA{interval: interval, window: window}
}

// Decide is Limit.Decide for the limit g was worked out from.
func (g GCRA) Decide(tat, now int64) (int64, Decision) {
	if tat < now {
		tat = now
	}
	next := tat + g.interval
	if next-now > g.window {
		// Denied: tat stays; the next request fits once next-window is past.
		return tat, Decision{
			Remaining:  0,
			Reset:      time.Duration(tat - now),
			RetryAfter: time.Duration(next - g.window - now),
		}
	}
	return next, Decision{
		Allowed:   true,
		Remaining: (g.window - (next - now)) / g.interval,
		Reset:     time.Duration(next - now),
	}
}

// CeilSeconds rounds d up to whole seconds, as Retry-After and the RateLimit
// header's t parameter need; a positive d never rounds to 0.
func CeilSeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}
