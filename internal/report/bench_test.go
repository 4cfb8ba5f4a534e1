package report

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// benchLog is a made-up log of n lines in the shape of Caddy's (about 900
// bytes each): 50 keys, a few unauthenticated requests, 200 paths, mostly
// 200s, lognormal durations.
func benchLog(n int) []byte {
	rng := rand.New(rand.NewPCG(3, 4))
	statuses := []int{200, 200, 200, 200, 200, 200, 200, 201, 204, 304, 401, 403, 404, 429, 500}
	var b bytes.Buffer
	for i := range n {
		l := logLine{
			ts:       t0 + float64(i)*0.0123456789,
			status:   statuses[rng.IntN(len(statuses))],
			size:     int64(rng.IntN(20000)),
			duration: 0.004 * math.Exp(rng.NormFloat64()),
			uri:      fmt.Sprintf("/v1/items/%d?fields=id,name&page=%d", rng.IntN(200), rng.IntN(10)),
			outcome:  "ok",
		}
		if k := rng.IntN(55); k < 50 {
			l.id = fmt.Sprintf("customer-%02d-prod", k)
			l.plan = []string{"free", "pro", "enterprise"}[k%3]
		} else {
			l.outcome = "missing"
		}
		b.WriteString(l.String())
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// BenchmarkReport reads a log into a report, grouped each way: lines/s is
// the speed of the whole read (lines, parsing, sums), on one goroutine.
func BenchmarkReport(b *testing.B) {
	const lines = 20000
	log := benchLog(lines)
	owners := make(map[string]string)
	for k := range 50 {
		owners[fmt.Sprintf("customer-%02d-prod", k)] = fmt.Sprintf("customer-%02d", k)
	}
	for _, by := range Groupings {
		b.Run(string(by), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(log)))
			n := 0
			for b.Loop() {
				r, err := New(Options{By: by, Owners: owners})
				if err != nil {
					b.Fatal(err)
				}
				if err := r.Read("bench", bytes.NewReader(log)); err != nil {
					b.Fatal(err)
				}
				if st := r.Stats(); st.Entries != lines {
					b.Fatalf("read %d entries, want %d", st.Entries, lines)
				}
				n++
			}
			b.ReportMetric(float64(n*lines)/b.Elapsed().Seconds(), "lines/s")
		})
	}
}

// BenchmarkParseLine is the parser alone, on one line.
func BenchmarkParseLine(b *testing.B) {
	line := []byte(sampleLines[0].String())
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	var e entry
	for b.Loop() {
		if parseLine(line, &e) != kindAccess {
			b.Fatal("not an access-log entry")
		}
	}
}

// BenchmarkParseLineEncodingJSON decodes the same line with encoding/json
// into a struct of the fields the report reads: what parseLine is
// measured against.
func BenchmarkParseLineEncodingJSON(b *testing.B) {
	line := []byte(sampleLines[0].String())
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	var e struct {
		Logger   string  `json:"logger"`
		Msg      string  `json:"msg"`
		TS       float64 `json:"ts"`
		Status   int     `json:"status"`
		Size     int64   `json:"size"`
		Duration float64 `json:"duration"`
		Request  struct {
			URI string `json:"uri"`
		} `json:"request"`
		APIKey *struct {
			ID   string `json:"id"`
			Plan string `json:"plan"`
		} `json:"api_key"`
	}
	for b.Loop() {
		if err := json.Unmarshal(line, &e); err != nil {
			b.Fatal(err)
		}
	}
}
