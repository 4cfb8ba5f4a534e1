package quota

import (
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    Quota
		wantErr string
	}{
		{"10000/month", Quota{10000, Month}, ""},
		{"1/hour", Quota{1, Hour}, ""},
		{"500/day", Quota{500, Day}, ""},
		{"7/week", Quota{7, Week}, ""},
		{"1000000000000/month", Quota{MaxCount, Month}, ""},
		{"010/day", Quota{10, Day}, ""},
		{"", Quota{}, "want <count>/<period>"},
		{"10000", Quota{}, "want <count>/<period>"},
		{"month", Quota{}, "want <count>/<period>"},
		{"/month", Quota{}, "count must be"},
		{"0/month", Quota{}, "count must be"},
		{"-1/month", Quota{}, "count must be"},
		{"+1/month", Quota{}, "count must be"},
		{"1.5/month", Quota{}, "count must be"},
		{"1e3/month", Quota{}, "count must be"},
		{" 10/month", Quota{}, "count must be"},
		{"1000000000001/month", Quota{}, "count must be"},
		{"99999999999999999999/month", Quota{}, "count must be"},
		{"10/", Quota{}, "period must be"},
		{"10/months", Quota{}, "period must be"},
		{"10/Month", Quota{}, "period must be"},
		{"10/1h", Quota{}, "period must be"},
		{"10/year", Quota{}, "period must be"},
		{"10/month ", Quota{}, "period must be"},
		{"10/day/day", Quota{}, "period must be"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse(%q) error = %v, want it to contain %q", tt.in, err, tt.wantErr)
				}
				if quoted := `quota "` + tt.in + `": `; !strings.HasPrefix(err.Error(), quoted) {
					t.Errorf("Parse(%q) error = %q, want it to start with %q", tt.in, err, quoted)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Parse(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestQuotaString(t *testing.T) {
	tests := []struct {
		q    Quota
		want string
	}{
		{Quota{10000, Month}, "10000/month"},
		{Quota{1, Hour}, "1/hour"},
		{Quota{24, Day}, "24/day"},
		{Quota{5, Week}, "5/week"},
		{Quota{}, "none"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if got := tt.q.String(); got != tt.want {
				t.Fatalf("%+v.String() = %q, want %q", tt.q, got, tt.want)
			}
			if tt.q.IsZero() {
				return
			}
			back, err := Parse(tt.want)
			if err != nil || back != tt.q {
				t.Fatalf("Parse(%q) = %+v, %v; want %+v", tt.want, back, err, tt.q)
			}
		})
	}
}

func TestQuotaIsZero(t *testing.T) {
	if !(Quota{}).IsZero() {
		t.Error("Quota{}.IsZero() = false, want true")
	}
	if (Quota{Count: 1, Period: Day}).IsZero() {
		t.Error("Quota{1, Day}.IsZero() = true, want false")
	}
}

func TestPeriodString(t *testing.T) {
	tests := []struct {
		p    Period
		want string
	}{
		{0, "none"},
		{Hour, "hour"},
		{Day, "day"},
		{Week, "week"},
		{Month, "month"},
		{9, "Period(9)"},
	}
	for _, tt := range tests {
		if got := tt.p.String(); got != tt.want {
			t.Errorf("Period(%d).String() = %q, want %q", uint8(tt.p), got, tt.want)
		}
	}
}

// date is time.Date in UTC, to keep the tables short.
func date(y int, m time.Month, d, h, min, sec, nsec int) time.Time {
	return time.Date(y, m, d, h, min, sec, nsec, time.UTC)
}

func TestBounds(t *testing.T) {
	tokyo := time.FixedZone("UTC+9", 9*60*60)
	tests := []struct {
		name      string
		p         Period
		t         time.Time
		wantStart time.Time
		wantEnd   time.Time
	}{
		{"hour/middle", Hour, date(2026, 3, 10, 14, 37, 5, 9), date(2026, 3, 10, 14, 0, 0, 0), date(2026, 3, 10, 15, 0, 0, 0)},
		{"hour/at start", Hour, date(2026, 3, 10, 14, 0, 0, 0), date(2026, 3, 10, 14, 0, 0, 0), date(2026, 3, 10, 15, 0, 0, 0)},
		{"hour/last nanosecond", Hour, date(2026, 3, 10, 14, 59, 59, 999999999), date(2026, 3, 10, 14, 0, 0, 0), date(2026, 3, 10, 15, 0, 0, 0)},
		{"hour/last of year", Hour, date(2026, 12, 31, 23, 30, 0, 0), date(2026, 12, 31, 23, 0, 0, 0), date(2027, 1, 1, 0, 0, 0, 0)},
		{"day/middle", Day, date(2026, 3, 10, 14, 37, 5, 0), date(2026, 3, 10, 0, 0, 0, 0), date(2026, 3, 11, 0, 0, 0, 0)},
		{"day/at midnight", Day, date(2026, 3, 11, 0, 0, 0, 0), date(2026, 3, 11, 0, 0, 0, 0), date(2026, 3, 12, 0, 0, 0, 0)},
		{"day/month end", Day, date(2026, 2, 28, 23, 0, 0, 0), date(2026, 2, 28, 0, 0, 0, 0), date(2026, 3, 1, 0, 0, 0, 0)},
		{"day/other zone is converted", Day, time.Date(2026, 3, 11, 8, 0, 0, 0, tokyo), date(2026, 3, 10, 0, 0, 0, 0), date(2026, 3, 11, 0, 0, 0, 0)},
		{"week/Tuesday", Week, date(2026, 3, 10, 14, 0, 0, 0), date(2026, 3, 9, 0, 0, 0, 0), date(2026, 3, 16, 0, 0, 0, 0)},
		{"week/Monday 00:00", Week, date(2026, 3, 9, 0, 0, 0, 0), date(2026, 3, 9, 0, 0, 0, 0), date(2026, 3, 16, 0, 0, 0, 0)},
		{"week/Sunday last nanosecond", Week, date(2026, 3, 15, 23, 59, 59, 999999999), date(2026, 3, 9, 0, 0, 0, 0), date(2026, 3, 16, 0, 0, 0, 0)},
		{"week/Thursday 2026-12-31", Week, date(2026, 12, 31, 12, 0, 0, 0), date(2026, 12, 28, 0, 0, 0, 0), date(2027, 1, 4, 0, 0, 0, 0)},
		{"week/Sunday 2027-01-03 across the year", Week, date(2027, 1, 3, 23, 0, 0, 0), date(2026, 12, 28, 0, 0, 0, 0), date(2027, 1, 4, 0, 0, 0, 0)},
		{"week/Monday 2027-01-04", Week, date(2027, 1, 4, 0, 0, 0, 0), date(2027, 1, 4, 0, 0, 0, 0), date(2027, 1, 11, 0, 0, 0, 0)},
		{"week/across a month", Week, date(2026, 4, 2, 0, 0, 0, 0), date(2026, 3, 30, 0, 0, 0, 0), date(2026, 4, 6, 0, 0, 0, 0)},
		{"week/Monday in UTC, Sunday in Tokyo is not", Week, time.Date(2026, 3, 9, 8, 0, 0, 0, tokyo), date(2026, 3, 2, 0, 0, 0, 0), date(2026, 3, 9, 0, 0, 0, 0)},
		{"month/middle", Month, date(2026, 3, 10, 14, 0, 0, 0), date(2026, 3, 1, 0, 0, 0, 0), date(2026, 4, 1, 0, 0, 0, 0)},
		{"month/at start", Month, date(2026, 3, 1, 0, 0, 0, 0), date(2026, 3, 1, 0, 0, 0, 0), date(2026, 4, 1, 0, 0, 0, 0)},
		{"month/last nanosecond", Month, date(2026, 3, 31, 23, 59, 59, 999999999), date(2026, 3, 1, 0, 0, 0, 0), date(2026, 4, 1, 0, 0, 0, 0)},
		{"month/February non-leap", Month, date(2027, 2, 28, 12, 0, 0, 0), date(2027, 2, 1, 0, 0, 0, 0), date(2027, 3, 1, 0, 0, 0, 0)},
		{"month/February leap", Month, date(2028, 2, 29, 12, 0, 0, 0), date(2028, 2, 1, 0, 0, 0, 0), date(2028, 3, 1, 0, 0, 0, 0)},
		{"month/December to January", Month, date(2026, 12, 31, 23, 59, 59, 0), date(2026, 12, 1, 0, 0, 0, 0), date(2027, 1, 1, 0, 0, 0, 0)},
		{"month/January", Month, date(2027, 1, 1, 0, 0, 0, 0), date(2027, 1, 1, 0, 0, 0, 0), date(2027, 2, 1, 0, 0, 0, 0)},
		{"none", 0, date(2026, 3, 10, 14, 0, 0, 0), date(2026, 3, 10, 14, 0, 0, 0), date(2026, 3, 10, 14, 0, 0, 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start, end := tt.p.Bounds(tt.t)
			if !start.Equal(tt.wantStart) || !end.Equal(tt.wantEnd) {
				t.Fatalf("%s.Bounds(%s) = %s, %s; want %s, %s", tt.p, tt.t, start, end, tt.wantStart, tt.wantEnd)
			}
			if start.Location() != time.UTC || end.Location() != time.UTC {
				t.Errorf("%s.Bounds(%s) returned locations %s, %s; want UTC", tt.p, tt.t, start.Location(), end.Location())
			}
		})
	}
}

// TestBoundsWindow checks the lengths a RateLimit-Policy w= reports: they
// vary with the calendar, and a UTC day never has 23 or 25 hours.
func TestBoundsWindow(t *testing.T) {
	tests := []struct {
		p    Period
		t    time.Time
		want time.Duration
	}{
		{Hour, date(2026, 3, 29, 1, 30, 0, 0), time.Hour},
		{Day, date(2026, 3, 29, 1, 30, 0, 0), 24 * time.Hour}, // a DST change in Europe
		{Week, date(2026, 3, 29, 1, 30, 0, 0), 7 * 24 * time.Hour},
		{Month, date(2027, 2, 10, 0, 0, 0, 0), 28 * 24 * time.Hour},
		{Month, date(2028, 2, 10, 0, 0, 0, 0), 29 * 24 * time.Hour},
		{Month, date(2026, 4, 10, 0, 0, 0, 0), 30 * 24 * time.Hour},
		{Month, date(2026, 12, 10, 0, 0, 0, 0), 31 * 24 * time.Hour},
	}
	for _, tt := range tests {
		start, end := tt.p.Bounds(tt.t)
		if got := end.Sub(start); got != tt.want {
			t.Errorf("%s.Bounds(%s) spans %s, want %s", tt.p, tt.t, got, tt.want)
		}
	}
}

// FuzzBounds checks what every period must satisfy for any instant: it
// contains t, starts on its calendar boundary, and is followed directly by
// the next period.
func FuzzBounds(f *testing.F) {
	for _, t := range []time.Time{
		date(2026, 12, 31, 12, 0, 0, 0),
		date(2027, 1, 3, 23, 0, 0, 0),
		date(2028, 2, 29, 23, 59, 59, 999999999),
		date(1970, 1, 1, 0, 0, 0, 0),
		date(2000, 3, 1, 0, 0, 0, 0),
	} {
		f.Add(t.UnixNano())
	}
	f.Fuzz(func(t *testing.T, ns int64) {
		tm := time.Unix(0, ns)
		for p := Hour; p <= Month; p++ {
			start, end := p.Bounds(tm)
			if tm.Before(start) || !tm.Before(end) {
				t.Fatalf("%s.Bounds(%s) = [%s, %s), which does not contain it", p, tm.UTC(), start, end)
			}
			if s2, e2 := p.Bounds(start); !s2.Equal(start) || !e2.Equal(end) {
				t.Fatalf("%s.Bounds(%s) = [%s, %s), want the same period as for %s", p, start, s2, e2, tm.UTC())
			}
			if next, _ := p.Bounds(end); !next.Equal(end) {
				t.Fatalf("%s.Bounds(%s) starts at %s, want it to start at its own instant", p, end, next)
			}
			if start.Minute() != 0 || start.Second() != 0 || start.Nanosecond() != 0 {
				t.Fatalf("%s.Bounds(%s) starts at %s, not on the hour", p, tm.UTC(), start)
			}
			if p != Hour && start.Hour() != 0 {
				t.Fatalf("%s.Bounds(%s) starts at %s, not at midnight", p, tm.UTC(), start)
			}
			if p == Week && start.Weekday() != time.Monday {
				t.Fatalf("week of %s starts on %s, want Monday", tm.UTC(), start.Weekday())
			}
			if p == Month && start.Day() != 1 {
				t.Fatalf("month of %s starts on day %d, want 1", tm.UTC(), start.Day())
			}
		}
	})
}

// FuzzParse checks that whatever Parse accepts is in range and prints back
// to an input Parse reads as the same quota.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"10000/month", "1/hour", "7/week", "0/day", "1000000000001/day", "10/", "/", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		q, err := Parse(s)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "quota ") {
				t.Fatalf("Parse(%q) error %q does not name the quota", s, err)
			}
			return
		}
		if q.Count < 1 || q.Count > MaxCount || !q.Period.valid() {
			t.Fatalf("Parse(%q) = %+v, out of range", s, q)
		}
		back, err := Parse(q.String())
		if err != nil || back != q {
			t.Fatalf("Parse(%q) = %+v, %v; want %+v", q.String(), back, err, q)
		}
	})
}
