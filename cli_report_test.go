package apikey

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// reportRow is a row of `report --format json`, as a script reads it.
type reportRow struct {
	By           string   `json:"by"`
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

// reportJSON runs report --format json with args and returns its rows by
// group, failing on any error or message.
func reportJSON(t *testing.T, args ...string) map[string]reportRow {
	t.Helper()
	out, errOut, err := cliRun(t, reportCommand(), "", append([]string{"--format", "json"}, args...)...)
	if err != nil || errOut != "" {
		t.Fatalf("report %q: %v\nstderr: %s", args, err, errOut)
	}
	var rows []reportRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("report %q: output is not a JSON array: %v\n%s", args, err, out)
	}
	m := make(map[string]reportRow)
	for _, r := range rows {
		m[r.Group] = r
	}
	return m
}

// requestsOf returns the requests of each group.
func requestsOf(rows map[string]reportRow) map[string]int64 {
	m := make(map[string]int64)
	for g, r := range rows {
		m[g] = r.Requests
	}
	return m
}

// reportLog writes a log file of lines in dir and returns its path.
func reportLog(t *testing.T, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// Access-log lines as Caddy writes them (trimmed headers): two keys, a
// missing key.
const (
	reportLineA = `{"level":"info","ts":1772366400.25,"logger":"http.log.access.log0","msg":"handled request","request":{"remote_ip":"127.0.0.1","proto":"HTTP/1.1","method":"GET","host":"api.example.com","uri":"/v1/items?page=2","headers":{"Authorization":["REDACTED"]}},"bytes_read":0,"user_id":"acme-prod","duration":0.0021,"size":120,"status":200,"resp_headers":{"Server":["Caddy"]},"api_key":{"id":"acme-prod","plan":"pro","outcome":"ok"}}`
	reportLineB = `{"level":"info","ts":1772366401.5,"logger":"http.log.access.log0","msg":"handled request","request":{"remote_ip":"127.0.0.1","proto":"HTTP/1.1","method":"GET","host":"api.example.com","uri":"/v1/items","headers":{}},"bytes_read":0,"user_id":"globex-trial","duration":0.0003,"size":0,"status":429,"resp_headers":{"Retry-After":["20"]},"api_key":{"id":"globex-trial","outcome":"rate_limited"}}`
	reportLineC = `{"level":"info","ts":1772366402,"logger":"http.log.access.log0","msg":"handled request","request":{"remote_ip":"127.0.0.1","proto":"HTTP/1.1","method":"GET","host":"api.example.com","uri":"/","headers":{}},"bytes_read":0,"user_id":"","duration":0.0001,"size":0,"status":401,"resp_headers":{},"api_key":{"outcome":"missing"}}`
	reportOther = `{"level":"info","ts":1772366399,"logger":"tls","msg":"cleaning storage unit","storage":"FileStorage:/data/caddy"}`
)

const reportKeysFile = `{"keys": [
  {"id": "acme-prod", "hash": "sha256:027620ca04c93ba8352ec2ef90660cb63a48c83e7b07b61b49191ae2274b0124", "owner": "acme"},
  {"id": "globex-trial", "hash": "sha256:2883f3a637ee51c37077ff4a07131506dff6a4d5324de2604d04f56aa9ca294c", "owner": "globex", "rate": "bogus"}
]}`

func TestReportCommandErrors(t *testing.T) {
	dir := t.TempDir()
	log := reportLog(t, dir, "access.log", reportLineA+"\n")
	keys := reportLog(t, dir, "keys.json", reportKeysFile)
	tests := []struct {
		name string
		args []string
		err  string
	}{
		{"no files", nil, "no log files: give one or more access log files, or - for standard input"},
		{"missing file", []string{log, filepath.Join(dir, "nope.log")}, "log file: stat " + filepath.Join(dir, "nope.log")},
		{"directory", []string{dir}, "is a directory: give the files in it"},
		{"stdin twice", []string{"-", "-"}, "- (standard input) is given twice"},
		{"bad --by", []string{"--by", "host", log}, `--by "host": want key, owner, plan, status or path`},
		{"bad --format", []string{"--format", "yaml", log}, `--format "yaml": want table, json or csv`},
		{"--by owner without keys file", []string{"--by", "owner", log}, "--by owner needs --keys-file"},
		{"--owner without keys file", []string{"--owner", "acme", log}, "--owner needs --keys-file"},
		{"unknown owner", []string{"--owner", "initech", "--keys-file", keys, log}, `--owner "initech": no key in ` + keys + " has this owner"},
		{"missing keys file", []string{"--by", "owner", "--keys-file", filepath.Join(dir, "k.json"), log}, "reading keys file"},
		{"not a keys file", []string{"--by", "owner", "--keys-file", log, log}, "loading keys file " + log},
		{"--lines with --format", []string{"--lines", "--format", "json", log}, "--lines prints log lines, not a report"},
		{"--lines with --by", []string{"--lines", "--by", "path", log}, "it takes no --by or --format"},
		{"bad --since", []string{"--since", "yesterday", log}, `--since "yesterday": want an RFC 3339 time`},
		{"negative --until", []string{"--until", "-1h", log}, `--until "-1h"`},
		{"empty range", []string{"--since", "1h", "--until", "2h", log}, "the time range is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, _, err := cliRun(t, reportCommand(), "", tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Fatalf("err = %v, want one with %q", err, tt.err)
			}
			if out != "" && !strings.HasPrefix(out, "Usage:") {
				t.Errorf("printed a report on error:\n%s", out)
			}
		})
	}
}

func TestReportTime(t *testing.T) {
	now := time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Time
		err  bool
	}{
		{"", time.Time{}, false},
		{"2026-03-01T00:00:00Z", time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC), false},
		{"2026-03-01T01:00:00.5+01:00", time.Date(2026, 3, 1, 0, 0, 0, 5e8, time.UTC), false},
		{"24h", now.Add(-24 * time.Hour), false},
		{"7d", now.Add(-7 * 24 * time.Hour), false},
		{"90m", now.Add(-90 * time.Minute), false},
		{"0s", time.Time{}, true},
		{"-1h", time.Time{}, true},
		{"2026-03-01", time.Time{}, true},
		{"soon", time.Time{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := reportTime("since", tt.in, now)
			if (err != nil) != tt.err || !got.Equal(tt.want) {
				t.Errorf("reportTime(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.err)
			}
		})
	}

	t.Run("clock", func(t *testing.T) {
		// An hour back from this clock is 0.25 s before the last line.
		clock := func() time.Time { return time.Unix(1772366402, 0).Add(time.Hour - 250*time.Millisecond) }
		dir := t.TempDir()
		log := reportLog(t, dir, "access.log", reportLineA+"\n"+reportLineB+"\n"+reportLineC+"\n")
		out, _, err := cliRun(t, reportCommandAt(clock), "", "--since", "1h", "--format", "csv", log)
		if err != nil {
			t.Fatal(err)
		}
		if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 2 || !strings.HasPrefix(lines[1], "key,(none),1,100,") {
			t.Errorf("report since 1h ago:\n%s", out)
		}
	})
}

func TestReportOwners(t *testing.T) {
	dir := t.TempDir()
	// An entry the server would refuse (a bad rate) still gives its owner;
	// one without an id gives none.
	path := reportLog(t, dir, "keys.json", `{"keys": [
		{"id": "a", "hash": "sha256:00", "owner": "acme", "rate": "fast"},
		{"id": "b", "hash": "sha256:00"},
		{"hash": "sha256:00", "owner": "nobody"},
		{"id": 7, "owner": "typo"}
	]}`)
	got, err := reportOwners(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]string{"a": "acme", "b": ""}; !maps.Equal(got, want) {
		t.Errorf("owners = %v, want %v", got, want)
	}
}

func TestReportFiles(t *testing.T) {
	dir := t.TempDir()
	keys := reportLog(t, dir, "keys.json", reportKeysFile)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	io.WriteString(zw, reportOther+"\n"+reportLineA+"\n")
	zw.Close()
	// A rotated set: the old file compressed, the current one plain.
	old := reportLog(t, dir, "access-2026-03-01T12-00-00.000.log.gz", gz.String())
	cur := reportLog(t, dir, "access.log", reportLineB+"\n"+reportLineC+"\n")
	want := map[string]int64{"acme-prod": 1, "globex-trial": 1, "(none)": 1}

	t.Run("rotated set", func(t *testing.T) {
		if got := requestsOf(reportJSON(t, old, cur)); !maps.Equal(got, want) {
			t.Errorf("groups = %v, want %v", got, want)
		}
	})
	t.Run("stdin", func(t *testing.T) {
		for name, stdin := range map[string]string{"plain": reportLineA + "\n" + reportLineB + "\n", "gzip": gz.String()} {
			out, errOut, err := cliRun(t, reportCommand(), stdin, "--format", "csv", "--by", "status", "-")
			if err != nil || errOut != "" {
				t.Fatalf("%s: %v %s", name, err, errOut)
			}
			if !strings.Contains(out, "\nstatus,200,1,") {
				t.Errorf("%s: report of stdin:\n%s", name, out)
			}
		}
		out, _, err := cliRun(t, reportCommand(), reportLineC+"\n", "--format", "csv", old, "-", cur)
		if err != nil || strings.Count(out, "\n") != 4 || !strings.Contains(out, "key,(none),2,") {
			t.Errorf("files and stdin: %v\n%s", err, out)
		}
	})
	t.Run("by owner", func(t *testing.T) {
		got := requestsOf(reportJSON(t, "--by", "owner", "--keys-file", keys, old, cur))
		if want := map[string]int64{"acme": 1, "globex": 1, "(none)": 1}; !maps.Equal(got, want) {
			t.Errorf("groups = %v, want %v", got, want)
		}
	})
	t.Run("lines", func(t *testing.T) {
		out, errOut, err := cliRun(t, reportCommand(), "", "--lines", cur, old)
		if err != nil || errOut != "" {
			t.Fatal(err, errOut)
		}
		if want := reportLineB + "\n" + reportLineC + "\n" + reportLineA + "\n"; out != want {
			t.Errorf("--lines:\n%s\nwant\n%s", out, want)
		}
		out, _, _ = cliRun(t, reportCommand(), "", "--lines", "--owner", "acme", "--keys-file", keys, cur, old)
		if out != reportLineA+"\n" {
			t.Errorf("--lines --owner acme:\n%s", out)
		}
	})
	t.Run("unparseable lines", func(t *testing.T) {
		bad := reportLog(t, dir, "mixed.log", "garbage\n"+reportLineA+"\n{\"a\":1}\n"+reportOther+"\n"+reportLineB[:60]+"\n")
		out, errOut, err := cliRun(t, reportCommand(), "", "--format", "csv", bad)
		if err != nil {
			t.Fatal(err)
		}
		if want := "skipped 3 lines that are not access-log entries (the first at " + bad + ":1)\n"; errOut != want {
			t.Errorf("stderr = %q, want %q", errOut, want)
		}
		if !strings.Contains(out, "\nkey,acme-prod,1,100,") {
			t.Errorf("report:\n%s", out)
		}
		_, errOut, _ = cliRun(t, reportCommand(), "", "--format", "csv", reportLog(t, dir, "one.log", "x\n"))
		if want := "skipped 1 line that is not an access-log entry (the first at " + filepath.Join(dir, "one.log") + ":1)\n"; errOut != want {
			t.Errorf("stderr = %q, want %q", errOut, want)
		}
	})
}

// TestReportCaddy runs a real Caddy with an api_key site, sends it a known
// mix of requests, and checks the report of its access log.
func TestReportCaddy(t *testing.T) {
	dir := t.TempDir()
	keys := map[string]string{ // id: key
		"rpt-alpha": "rpt_alpha_Xq3v9LmP2wKs",
		"rpt-beta":  "rpt_beta_Hn7cT4bZ8dRe",
		"rpt-gamma": "rpt_gamma_Jw5yF1sQ6uVo",
	}
	keysFile := filepath.Join(dir, "keys.json")
	reportLog(t, dir, "keys.json", fmt.Sprintf(`{"keys": [
		{"id": "rpt-alpha", "hash": %q, "owner": "alpha", "plan": "pro"},
		{"id": "rpt-beta", "hash": %q, "owner": "beta", "rate": "2/1m"},
		{"id": "rpt-gamma", "hash": %q, "owner": "alpha", "allow_methods": ["GET"]}
	]}`, sha256Hex(keys["rpt-alpha"]), sha256Hex(keys["rpt-beta"]), sha256Hex(keys["rpt-gamma"])))
	accessLog, caddyLog := filepath.Join(dir, "access.log"), filepath.Join(dir, "caddy.log")
	port := reportFreePort(t)
	caddyfile := fmt.Sprintf(`{
	admin off
	persist_config off
	storage file_system %s
	default_bind 127.0.0.1
	log {
		output file %s
		format json
	}
}

:%d {
	log {
		output file %s
		format json
	}
	api_key {
		keys_file %s
		plan pro {
			rate off
		}
	}
	respond "hello {http.api_key.id}"
}
`, filepath.Join(dir, "storage"), caddyLog, port, accessLog, keysFile)
	adapter := caddyconfig.GetAdapter("caddyfile")
	config, _, err := adapter.Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	if err := caddy.Load(config, true); err != nil {
		t.Fatalf("loading config: %v", err)
	}

	client := &http.Client{Timeout: 10 * time.Second}
	t.Cleanup(client.CloseIdleConnections)
	bytesOut := make(map[string]int64) // by key id, "" for none
	send := func(method, uri, key string, wantStatus int) {
		t.Helper()
		req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", port, uri), nil)
		if err != nil {
			t.Fatal(err)
		}
		id := ""
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
			for k, v := range keys {
				if v == key {
					id = k
				}
			}
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, uri, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != wantStatus {
			t.Fatalf("%s %s with key id %q: status %d, want %d", method, uri, id, resp.StatusCode, wantStatus)
		}
		bytesOut[id] += int64(len(body))
	}
	for i := range 5 {
		send("GET", fmt.Sprintf("/v1/items?page=%d", i), keys["rpt-alpha"], 200)
	}
	send("GET", "/v1/orders", keys["rpt-beta"], 200)
	send("GET", "/v1/orders?x=1", keys["rpt-beta"], 200)
	send("GET", "/v1/orders", keys["rpt-beta"], 429)
	send("GET", "/v1/orders", keys["rpt-beta"], 429)
	send("GET", "/v1/items", keys["rpt-gamma"], 200)
	send("POST", "/v1/items", keys["rpt-gamma"], 403)
	send("GET", "/", "rpt_alpha_wrong", 401)
	send("GET", "/", "made-up", 401)
	send("GET", "/", "", 401)
	const total = 14

	// The access log line is written after the response is sent.
	deadline := time.Now().Add(10 * time.Second)
	for {
		data, _ := os.ReadFile(accessLog)
		if bytes.Count(data, []byte("\n")) >= total {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("access log has %d lines after 10s, want %d", bytes.Count(data, []byte("\n")), total)
		}
		time.Sleep(20 * time.Millisecond)
	}

	t.Run("by key", func(t *testing.T) {
		// The default log (Caddy's start-up lines) goes in too: its lines
		// are passed over without a word.
		rows := reportJSON(t, accessLog, caddyLog)
		want := map[string]reportRow{
			"rpt-alpha": {Requests: 5, Status2xx: 5},
			"rpt-beta":  {Requests: 4, Status2xx: 2, Status4xx: 2, Status429: 2},
			"rpt-gamma": {Requests: 2, Status2xx: 1, Status4xx: 1, Status403: 1},
			"(none)":    {Requests: 3, Status4xx: 3, Status401: 3},
		}
		if len(rows) != len(want) {
			t.Errorf("groups = %v, want %v", requestsOf(rows), want)
		}
		for group, w := range want {
			got, ok := rows[group]
			if !ok {
				t.Errorf("no group %q", group)
				continue
			}
			id := group
			if group == "(none)" {
				id = ""
			}
			if got.Requests != w.Requests || got.Status2xx != w.Status2xx || got.Status4xx != w.Status4xx ||
				got.Status5xx != 0 || got.Status401 != w.Status401 || got.Status403 != w.Status403 || got.Status429 != w.Status429 {
				t.Errorf("%s: %+v, want %+v", group, got, w)
			}
			if got.BytesOut != bytesOut[id] {
				t.Errorf("%s: bytes_out = %d, want %d (the bodies received)", group, got.BytesOut, bytesOut[id])
			}
			if want := 100 * float64(w.Requests) / total; got.SharePercent < want-0.01 || got.SharePercent > want+0.01 {
				t.Errorf("%s: share = %v, want %.2f", group, got.SharePercent, want)
			}
			if got.P50Seconds == nil || *got.P50Seconds <= 0 || *got.P99Seconds < *got.P50Seconds || *got.P99Seconds > 10 {
				t.Errorf("%s: percentiles %v %v %v", group, got.P50Seconds, got.P95Seconds, got.P99Seconds)
			}
			if got.FirstSeen == nil || got.LastSeen == nil || *got.LastSeen < *got.FirstSeen {
				t.Errorf("%s: first and last seen %v %v", group, got.FirstSeen, got.LastSeen)
			}
		}
		if r := rows["rpt-alpha"]; r.BytesOut != 5*int64(len("hello rpt-alpha")) {
			t.Errorf("rpt-alpha: bytes_out = %d", r.BytesOut)
		}
	})

	groupings := []struct {
		name string
		args []string
		want map[string]int64
	}{
		{"by status", []string{"--by", "status"}, map[string]int64{"200": 8, "401": 3, "403": 1, "429": 2}},
		{"by owner", []string{"--by", "owner", "--keys-file", keysFile}, map[string]int64{"alpha": 7, "beta": 4, "(none)": 3}},
		{"by plan", []string{"--by", "plan"}, map[string]int64{"pro": 5, "(none)": 9}},
		{"by path", []string{"--by", "path"}, map[string]int64{"/v1/items": 7, "/v1/orders": 4, "/": 3}},
		{"owner", []string{"--owner", "alpha", "--keys-file", keysFile}, map[string]int64{"rpt-alpha": 5, "rpt-gamma": 2}},
		{"key by status", []string{"--key", "rpt-beta", "--by", "status"}, map[string]int64{"200": 2, "429": 2}},
		{"since 1h", []string{"--since", "1h"}, map[string]int64{"rpt-alpha": 5, "rpt-beta": 4, "rpt-gamma": 2, "(none)": 3}},
		{"since a minute ahead", []string{"--since", time.Now().Add(time.Minute).Format(time.RFC3339)}, map[string]int64{}},
		{"until 1h", []string{"--until", "1h"}, map[string]int64{}},
	}
	for _, g := range groupings {
		t.Run(g.name, func(t *testing.T) {
			if got := requestsOf(reportJSON(t, append(g.args, accessLog)...)); !maps.Equal(got, g.want) {
				t.Errorf("groups = %v, want %v", got, g.want)
			}
		})
	}

	t.Run("table", func(t *testing.T) {
		out, errOut, err := cliRun(t, reportCommand(), "", "--by", "status", accessLog)
		if err != nil || errOut != "" {
			t.Fatal(err, errOut)
		}
		t.Logf("report --by status:\n%s", out)
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if len(lines) != 6 {
			t.Fatalf("%d lines, want a header, 4 statuses and a total:\n%s", len(lines), out)
		}
		wantFields := [][]string{
			{"STATUS", "REQUESTS", "SHARE", "2XX", "4XX", "5XX", "401", "403", "429", "BYTES", "OUT", "P50", "P95", "P99", "FIRST", "SEEN", "LAST", "SEEN"},
			{"200", "8", "57.1%", "8", "0", "0", "0", "0", "0"},
			{"401", "3", "21.4%", "0", "3", "0", "3", "0", "0"},
			{"429", "2", "14.3%", "0", "2", "0", "0", "0", "2"},
			{"403", "1", "7.1%", "0", "1", "0", "0", "1", "0"},
			{"TOTAL", "14", "100.0%", "8", "6", "0", "3", "1", "2"},
		}
		for i, want := range wantFields {
			if got := strings.Fields(lines[i]); len(got) < len(want) || !slices.Equal(got[:len(want)], want) {
				t.Errorf("line %d = %q, want it to start with %q", i, lines[i], want)
			}
		}
	})

	t.Run("lines of a key", func(t *testing.T) {
		out, errOut, err := cliRun(t, reportCommand(), "", "--key", "rpt-beta", "--lines", accessLog)
		if err != nil || errOut != "" {
			t.Fatal(err, errOut)
		}
		data, err := os.ReadFile(accessLog)
		if err != nil {
			t.Fatal(err)
		}
		var want strings.Builder
		for line := range strings.Lines(string(data)) {
			if strings.Contains(line, `"api_key":{"id":"rpt-beta"`) {
				want.WriteString(line)
			}
		}
		if out != want.String() || strings.Count(out, "\n") != 4 {
			t.Errorf("--key rpt-beta --lines:\n%s\nwant the 4 lines of the key as they are in the log:\n%s", out, want.String())
		}
	})
}

// reportFreePort returns a loopback TCP port that was free a moment ago.
func reportFreePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
