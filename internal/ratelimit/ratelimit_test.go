package ratelimit

import (
	"strings"
	"testing"
	"time"
)

func TestParseRate(t *testing.T) {
	tests := []struct {
		in      string
		want    Limit
		wantErr string
	}{
		{"600/1m", Limit{600, time.Minute, 600}, ""},
		{"10/s", Limit{10, time.Second, 10}, ""},
		{"5000/1h", Limit{5000, time.Hour, 5000}, ""},
		{"100/1d", Limit{100, 24 * time.Hour, 100}, ""},
		{"1/500ms", Limit{1, 500 * time.Millisecond, 1}, ""},
		{"3/90s", Limit{3, 90 * time.Second, 3}, ""},
		{"10/100ms", Limit{10, 100 * time.Millisecond, 10}, ""},
		{"1/1ms", Limit{1, time.Millisecond, 1}, ""},
		{"1/1.5ms", Limit{1, 1500 * time.Microsecond, 1}, ""},
		{"100/1m", Limit{100, time.Minute, 100}, ""},
		{"60/1m", Limit{60, time.Minute, 60}, ""},
		{"5/1h", Limit{5, time.Hour, 5}, ""},
		{"1/d", Limit{1, 24 * time.Hour, 1}, ""},
		{"7/2d", Limit{7, 48 * time.Hour, 7}, ""},
		{"1/366d", Limit{1, 366 * 24 * time.Hour, 1}, ""},
		{"1/1h30m", Limit{1, 90 * time.Minute, 1}, ""},
		{"3/1.5s", Limit{3, 1500 * time.Millisecond, 3}, ""},
		{"10/ms", Limit{10, time.Millisecond, 10}, ""},
		{"10", Limit{}, "want <count>/<duration>"},
		{"0/1m", Limit{}, "count must be"},
		{"-1/1m", Limit{}, "count must be"},
		{"x/1m", Limit{}, "count must be"},
		{"1000000001/1s", Limit{}, "count must be"},
		{"10/0s", Limit{}, "duration must be positive"},
		{"10/-1m", Limit{}, "duration must be positive"},
		{"10/", Limit{}, "invalid duration"},
		{"10/1x", Limit{}, "invalid duration"},
		{"10/400d", Limit{}, "invalid duration"},
		{"10/367d", Limit{}, "invalid duration"},
		{"1000000000/1ms", Limit{}, "more than one request per nanosecond"},
		{"1/1ns", Limit{}, "duration units must be ms, s, m, h or d"},
		{"1/ns", Limit{}, "duration units must be ms, s, m, h or d"},
		{"1/1us", Limit{}, "duration units must be ms, s, m, h or d"},
		{"1/1µs", Limit{}, "duration units must be ms, s, m, h or d"}, // U+00B5 micro sign
		{"1/1μs", Limit{}, "duration units must be ms, s, m, h or d"}, // U+03BC Greek mu
		{"2/µs", Limit{}, "duration units must be ms, s, m, h or d"},
		{"1/1500us", Limit{}, "duration units must be ms, s, m, h or d"}, // 1.5ms, but in us
		{"1/1s1ns", Limit{}, "duration units must be ms, s, m, h or d"},
		{"1/0.5ms", Limit{}, "duration must be at least 1ms"},
		{"1/.999ms", Limit{}, "duration must be at least 1ms"},
		{"1/1e-9d", Limit{}, "duration must be at least 1ms"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseRate(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseRate(%q) error = %v, want it to contain %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseRate(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
			}
		})
	}
}

// TestDecide walks a 3/1m limit (one request back every 20 s) through a
// burst, the refusals, and the refill, at a clock it sets.
func TestDecide(t *testing.T) {
	lim := Limit{Count: 3, Period: time.Minute, Burst: 3}
	const s = int64(time.Second)
	start := int64(time.Hour)
	steps := []struct {
		at            int64
		wantAllowed   bool
		wantRemaining int64
		wantReset     time.Duration
		wantRetry     time.Duration
	}{
		{0, true, 2, 20 * time.Second, 0},
		{0, true, 1, 40 * time.Second, 0},
		{0, true, 0, 60 * time.Second, 0},
		{0, false, 0, 60 * time.Second, 20 * time.Second},
		{19 * s, false, 0, 41 * time.Second, time.Second},
		{20 * s, true, 0, 60 * time.Second, 0},
		{50 * s, true, 0, 50 * time.Second, 0},
		{200 * s, true, 2, 20 * time.Second, 0},
	}
	var tat int64
	for i, st := range steps {
		var d Decision
		tat, d = lim.Decide(tat, start+st.at)
		if d.Allowed != st.wantAllowed || d.Remaining != st.wantRemaining || d.Reset != st.wantReset || d.RetryAfter != st.wantRetry {
			t.Errorf("step %d at %v: got %+v, want allowed=%v remaining=%d reset=%v retry=%v",
				i, time.Duration(st.at), d, st.wantAllowed, st.wantRemaining, st.wantReset, st.wantRetry)
		}
	}
}

// TestDecideBurst checks that a burst smaller than the count caps how many
// requests pass at once, and that the long-run rate is the count.
func TestDecideBurst(t *testing.T) {
	lim := Limit{Count: 600, Period: time.Minute, Burst: 5}
	now := int64(time.Hour)
	var tat int64
	allowed := 0
	for range 100 {
		var d Decision
		tat, d = lim.Decide(tat, now)
		if d.Allowed {
			allowed++
		}
	}
	if allowed != 5 {
		t.Fatalf("burst admitted %d at once, want 5", allowed)
	}
	// Over the next minute, one request every 10 ms: all 6000 tries, 600 pass.
	allowed = 0
	for i := range 6000 {
		var d Decision
		tat, d = lim.Decide(tat, now+int64(i+1)*int64(10*time.Millisecond))
		if d.Allowed {
			allowed++
		}
	}
	if allowed != 600 {
		t.Fatalf("a minute at 100/s admitted %d, want 600", allowed)
	}
}

func TestCeilSeconds(t *testing.T) {
	for _, tt := range []struct {
		in   time.Duration
		want int64
	}{
		{0, 0}, {-time.Second, 0}, {time.Nanosecond, 1}, {time.Second, 1},
		{time.Second + 1, 2}, {59*time.Second + 999*time.Millisecond, 60},
	} {
		if got := CeilSeconds(tt.in); got != tt.want {
			t.Errorf("CeilSeconds(%v) = %d, want %d", tt.in, got, tt.want)
		}
	}
}
