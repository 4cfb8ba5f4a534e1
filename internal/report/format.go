package report

import (
	"encoding/csv"
	"encoding/json"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Formats lists the output formats, in the order help texts give them.
var Formats = []string{"table", "json", "csv"}

// Write writes rows (and, for the table, total) in format, which must be
// one of Formats.
func Write(w io.Writer, format string, by By, rows []Row, total Row) error {
	switch format {
	case "json":
		return WriteJSON(w, by, rows)
	case "csv":
		return WriteCSV(w, by, rows)
	}
	return WriteTable(w, by, rows, total)
}

// WriteTable writes rows as an aligned table for people: a header, a line
// per group, and total. Numbers are right-aligned; bytes are in IEC units
// and durations rounded to three digits; times are RFC 3339 in UTC, to
// the second.
func WriteTable(w io.Writer, by By, rows []Row, total Row) error {
	table := [][]string{{strings.ToUpper(string(by)), "REQUESTS", "SHARE", "2XX", "4XX", "5XX",
		"401", "403", "429", "BYTES OUT", "P50", "P95", "P99", "FIRST SEEN", "LAST SEEN"}}
	for _, r := range append(rows, total) {
		share := "-"
		if r.Requests > 0 {
			share = strconv.FormatFloat(r.Share, 'f', 1, 64) + "%"
		}
		p50, p95, p99 := "-", "-", "-"
		if r.HasDuration {
			p50, p95, p99 = formatDuration(r.P50), formatDuration(r.P95), formatDuration(r.P99)
		}
		table = append(table, []string{printable(r.Group), itoa(r.Requests), share,
			itoa(r.Status2xx), itoa(r.Status4xx), itoa(r.Status5xx),
			itoa(r.Status401), itoa(r.Status403), itoa(r.Status429),
			formatBytes(r.BytesOut), p50, p95, p99, formatTime(r.FirstSeen), formatTime(r.LastSeen)})
	}
	// The group and the times read from the left, the numbers from the
	// right.
	left := func(col int) bool { return col == 0 || col >= 13 }
	widths := make([]int, len(table[0]))
	for _, row := range table {
		for col, cell := range row {
			widths[col] = max(widths[col], utf8.RuneCountInString(cell))
		}
	}
	var b strings.Builder
	for _, row := range table {
		for col, cell := range row {
			pad := strings.Repeat(" ", widths[col]-utf8.RuneCountInString(cell))
			if col > 0 {
				b.WriteString("  ")
			}
			if left(col) {
				b.WriteString(cell)
				if col < len(row)-1 {
					b.WriteString(pad)
				}
			} else {
				b.WriteString(pad)
				b.WriteString(cell)
			}
		}
		b.WriteByte('\n')
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// jsonRow is a Row as WriteJSON writes it. Its field names are an
// interface: scripts read them.
type jsonRow struct {
	By           By       `json:"by"`
	Group        string   `json:"group"`
	Requests     int64    `json:"requests"`
	SharePercent float64  `json:"share_percent"`
	Status2xx    int64    `json:"status_2xx"`
	Status4xx    int64    `json:"status_4xx"`
	Status5xx    int64    `json:"status_5xx"`
	Status401    int64    `json:"status_401"`
	Status403    int64    `json:"status_403"`
	Status429    int64    `json:"status_429"`
	BytesOut     int64    `json:"bytes_out"`
	P50Seconds   *float64 `json:"p50_seconds"`
	P95Seconds   *float64 `json:"p95_seconds"`
	P99Seconds   *float64 `json:"p99_seconds"`
	FirstSeen    *string  `json:"first_seen"`
	LastSeen     *string  `json:"last_seen"`
}

// WriteJSON writes rows as a JSON array of objects, one per group, with
// the field names of jsonRow; durations are in seconds, times RFC 3339 in
// UTC, and an unknown duration or time is null.
func WriteJSON(w io.Writer, by By, rows []Row) error {
	out := make([]jsonRow, len(rows))
	for i, r := range rows {
		out[i] = jsonRow{
			By: by, Group: r.Group, Requests: r.Requests, SharePercent: round2(r.Share),
			Status2xx: r.Status2xx, Status4xx: r.Status4xx, Status5xx: r.Status5xx,
			Status401: r.Status401, Status403: r.Status403, Status429: r.Status429,
			BytesOut: r.BytesOut,
		}
		if r.HasDuration {
			p50, p95, p99 := r.P50.Seconds(), r.P95.Seconds(), r.P99.Seconds()
			out[i].P50Seconds, out[i].P95Seconds, out[i].P99Seconds = &p50, &p95, &p99
		}
		if !r.FirstSeen.IsZero() {
			first, last := r.FirstSeen.Format(time.RFC3339Nano), r.LastSeen.Format(time.RFC3339Nano)
			out[i].FirstSeen, out[i].LastSeen = &first, &last
		}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

// csvHeader is the first line of WriteCSV: jsonRow's field names.
var csvHeader = []string{"by", "group", "requests", "share_percent", "status_2xx", "status_4xx",
	"status_5xx", "status_401", "status_403", "status_429", "bytes_out", "p50_seconds",
	"p95_seconds", "p99_seconds", "first_seen", "last_seen"}

// WriteCSV writes rows as CSV with a header line; the columns are those of
// WriteJSON, and an unknown value is empty.
func WriteCSV(w io.Writer, by By, rows []Row) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(csvHeader); err != nil {
		return err
	}
	for _, r := range rows {
		var p50, p95, p99, first, last string
		if r.HasDuration {
			p50, p95, p99 = secondsText(r.P50), secondsText(r.P95), secondsText(r.P99)
		}
		if !r.FirstSeen.IsZero() {
			first, last = r.FirstSeen.Format(time.RFC3339Nano), r.LastSeen.Format(time.RFC3339Nano)
		}
		err := cw.Write([]string{string(by), r.Group, itoa(r.Requests),
			strconv.FormatFloat(round2(r.Share), 'f', -1, 64),
			itoa(r.Status2xx), itoa(r.Status4xx), itoa(r.Status5xx),
			itoa(r.Status401), itoa(r.Status403), itoa(r.Status429),
			itoa(r.BytesOut), p50, p95, p99, first, last})
		if err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func round2(x float64) float64 { return math.Round(x*100) / 100 }

func secondsText(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
}

func formatTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

// threeDigits writes x (at least 1) with three significant digits, or
// more if it is 1000 or over.
func threeDigits(x float64) string {
	switch {
	case x < 9.995:
		return strconv.FormatFloat(x, 'f', 2, 64)
	case x < 99.95:
		return strconv.FormatFloat(x, 'f', 1, 64)
	}
	return strconv.FormatFloat(x, 'f', 0, 64)
}

// formatDuration writes d with three significant digits in the largest
// unit under which it is at least 1 (ns, µs, ms, s); from 1000 s on, in
// Go's h/m/s form, to the second.
func formatDuration(d time.Duration) string {
	switch {
	case d < time.Microsecond:
		return strconv.FormatInt(int64(d), 10) + "ns"
	case d < 999500*time.Nanosecond:
		return threeDigits(float64(d)/1e3) + "µs"
	case d < 999500*time.Microsecond:
		return threeDigits(float64(d)/1e6) + "ms"
	case d < 999500*time.Millisecond:
		return threeDigits(float64(d)/1e9) + "s"
	}
	return d.Round(time.Second).String()
}

// formatBytes writes n in IEC units with three significant digits.
func formatBytes(n int64) string {
	if n < 1024 {
		return strconv.FormatInt(n, 10) + " B"
	}
	x, unit := float64(n)/1024, 0
	for x >= 999.5 && unit < len("KMGTPE")-1 {
		x /= 1024
		unit++
	}
	return threeDigits(x) + " " + "KMGTPE"[unit:unit+1] + "iB"
}

// printable replaces the control characters of a group name (a path can
// hold any) so that a log cannot send escape sequences to a terminal.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f || r >= 0x80 && r < 0xa0 {
			return '?'
		}
		return r
	}, s)
}
