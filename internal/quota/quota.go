// Package quota holds the per-key quotas of the api_key handler, such as
// "10000/month": the UTC calendar periods they count in, their parsing, and
// a Store that counts admitted requests in memory and persists the counts
// in a bbolt file so that they survive restarts. It knows nothing of Caddy.
package quota

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// MaxCount is the largest count a quota may have. It is far above any real
// quota yet keeps Count, Used and Remaining far from int64 overflow.
const MaxCount = 1_000_000_000_000

// maxCountDigits is the length of MaxCount in decimal; a longer count is
// out of range whatever its digits, and checking the length first keeps
// parseCount from overflowing.
const maxCountDigits = 13

// Period is the calendar period a quota counts in. Periods are UTC calendar
// periods, not sliding windows, so that "10000/month" means what a customer
// reads on an invoice and every server agrees on when a period resets. The
// zero Period is "no period".
type Period uint8

// The periods a quota can count in. They start at 1 so that the zero Period
// means "none"; their values are stored on disk in counter keys, so they
// must never be renumbered.
const (
	Hour  Period = iota + 1 // from hh:00:00 UTC to the next hour
	Day                     // from 00:00 UTC to the next midnight UTC
	Week                    // ISO week: from Monday 00:00 UTC to the next Monday
	Month                   // from the 1st 00:00 UTC to the 1st of the next month
)

// String returns the name Parse accepts for p: "hour", "day", "week" or
// "month"; "none" for the zero Period.
func (p Period) String() string {
	switch p {
	case 0:
		return "none"
	case Hour:
		return "hour"
	case Day:
		return "day"
	case Week:
		return "week"
	case Month:
		return "month"
	}
	return "Period(" + strconv.Itoa(int(p)) + ")"
}

// valid reports whether p is one of the named periods.
func (p Period) valid() bool { return p >= Hour && p <= Month }

// Bounds returns the UTC calendar period of kind p that contains t: start is
// inclusive and end exclusive, so t exactly at a boundary belongs to the
// period it starts. The zero or an unknown Period has no bounds; Bounds then
// returns t, t. It does not allocate, as Store.Take calls it per request.
func (p Period) Bounds(t time.Time) (start, end time.Time) {
	t = t.UTC()
	y, m, d := t.Date()
	switch p {
	case Hour:
		start = time.Date(y, m, d, t.Hour(), 0, 0, 0, time.UTC)
		return start, start.Add(time.Hour)
	case Day:
		start = time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
		return start, time.Date(y, m, d+1, 0, 0, 0, 0, time.UTC)
	case Week:
		// Weekday counts from Sunday; ISO weeks start on Monday.
		back := (int(t.Weekday()) + 6) % 7
		start = time.Date(y, m, d-back, 0, 0, 0, 0, time.UTC)
		return start, time.Date(y, m, d-back+7, 0, 0, 0, 0, time.UTC)
	case Month:
		start = time.Date(y, m, 1, 0, 0, 0, 0, time.UTC)
		return start, time.Date(y, m+1, 1, 0, 0, 0, 0, time.UTC)
	}
	return t, t
}

// Quota is a number of admitted requests per calendar period. The zero
// Quota is "no quota".
type Quota struct {
	Count  int64
	Period Period
}

// IsZero reports whether q limits nothing.
func (q Quota) IsZero() bool { return q.Count == 0 }

// String returns q in the form Parse accepts, such as "10000/month", or
// "none" for the zero Quota.
func (q Quota) String() string {
	if q.IsZero() {
		return "none"
	}
	return strconv.FormatInt(q.Count, 10) + "/" + q.Period.String()
}

// Parse parses "<count>/<period>", for example "10000/month" or "500/day".
// The count is a whole number from 1 to MaxCount written in plain digits;
// the period is hour, day, week or month. Errors quote the input, which is
// configuration and never a secret.
func Parse(s string) (Quota, error) {
	countStr, periodStr, ok := strings.Cut(s, "/")
	if !ok {
		return Quota{}, fmt.Errorf("quota %q: want <count>/<period>, such as 10000/month", s)
	}
	count, ok := parseCount(countStr)
	if !ok {
		return Quota{}, fmt.Errorf("quota %q: count must be a whole number from 1 to %d", s, int64(MaxCount))
	}
	var p Period
	switch periodStr {
	case "hour":
		p = Hour
	case "day":
		p = Day
	case "week":
		p = Week
	case "month":
		p = Month
	default:
		return Quota{}, fmt.Errorf("quota %q: period must be hour, day, week or month", s)
	}
	return Quota{Count: count, Period: p}, nil
}

// parseCount accepts plain decimal digits only, unlike strconv.ParseInt,
// which would also take a sign; "+10/day" is more likely a typo than intent.
func parseCount(s string) (int64, bool) {
	if s == "" || len(s) > maxCountDigits {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, n >= 1 && n <= MaxCount
}
