package apikey_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// These tests are README's "Hostile input" table: requests and keys files
// meant to break the handler, each sent to a real Caddy over real HTTP.
// Every one must get a 4xx (or, for a keys file at start-up, a config
// error that names the file), never a 5xx or a panic. Rows that other
// tests already cover as fully are named in the README table, not
// repeated here.

// Who answers a hostile request.
const (
	// byServer is Go's HTTP server, which refuses the request before
	// Caddy's handlers run: no access log line, no challenge.
	byServer = "net/http"
	// byHandler is the api_key handler: a challenge on a 401 and an
	// access log line with the api_key outcome.
	byHandler = "api_key"
)

// hostileRequest is one request of TestHostileRequests, written as raw
// bytes, since a client library would refuse to send most of them.
type hostileRequest struct {
	name string
	// query is appended to the row's own path ("/r<n>"); header holds
	// whole header lines, each ending in \r\n.
	query  string
	header string
	// raw, when set, is the whole request instead, with {path} and
	// {host} standing for the row's path and the server's address.
	raw       string
	status    int
	by        string
	body      string            // checked when not empty
	challenge string            // the exact WWW-Authenticate value; "" means none
	userID    string            // the access log's user_id
	apiKey    map[string]string // the access log's api_key object
}

// hostileRaw sends raw on a new connection to addr and reads the response.
func hostileRaw(t *testing.T, addr, raw string) (*http.Response, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	// A server may answer (431) before it has read all of a huge request;
	// the write error then does not matter.
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = io.WriteString(conn, raw) })
	defer wg.Wait()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	return resp, string(body)
}

// hostilePathOf is the path of a logged request URI.
func hostilePathOf(uri string) string {
	path, _, _ := strings.Cut(uri, "?")
	return path
}

// TestHostileRequests sends the README's hostile requests over raw
// connections and checks the status and the challenge of each, the access
// log's api_key for those the handler answers, and that those Go's server
// answers never reached Caddy's handlers.
func TestHostileRequests(t *testing.T) {
	ok := e2eOK("one")
	const (
		challengeMissing = `Bearer realm="api"`
		challengeInvalid = `Bearer realm="api", error="invalid_token"`
	)
	bearerLine := "Authorization: Bearer " + e2eKey1 + "\r\n"
	rows := []hostileRequest{
		// Size.
		{name: "10 KiB key", header: "X-API-Key: " + strings.Repeat("k", 10<<10) + "\r\n",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		// Caddy's max_header_size is 16 KiB (net/http allows 4 KiB more).
		{name: "64 KiB header", header: "X-API-Key: " + strings.Repeat("k", 64<<10) + "\r\n",
			status: 431, by: byServer},
		{name: "2 MiB header", header: "X-Filler: " + strings.Repeat("f", 2<<20) + "\r\n",
			status: 431, by: byServer},

		// Bytes a key cannot hold.
		{name: "NUL in a header", header: "X-API-Key: ab\x00cd\r\n", status: 400, by: byServer},
		{name: "control byte in a header", header: "X-API-Key: ab\x01cd\r\n", status: 400, by: byServer},
		{name: "DEL in a header", header: "X-API-Key: ab\x7fcd\r\n", status: 400, by: byServer},
		{name: "tab in a header", header: "X-API-Key: ab\tcd\r\n",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "non-UTF-8 header", header: "X-API-Key: \xff\xfe\xfd\r\n",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "UTF-8 header", header: "X-API-Key: ключ\r\n",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "folded header line", header: "X-API-Key: " + e2eKey1 + "\r\n more\r\n",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "NUL in the request line", raw: "GET {path}?api_key=a\x00b HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
			status: 400, by: byServer},
		{name: "non-UTF-8 bytes in the query", query: "?api_key=\xff\xfe",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "percent-encoded non-UTF-8 in the query", query: "?api_key=%ff%fe",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},

		// Authorization.
		{name: "many identical Authorization headers", header: strings.Repeat(bearerLine, 100),
			status: 200, by: byHandler, body: "key=one", userID: "one", apiKey: ok},
		{name: "same key in two Authorization headers", header: bearerLine + bearerLine,
			status: 200, by: byHandler, body: "key=one", userID: "one", apiKey: ok},
		{name: "one of many Authorization headers differs", header: strings.Repeat(bearerLine, 100) + "Authorization: Bearer other\r\n",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "1000 Authorization headers", header: strings.Repeat(bearerLine, 1000),
			status: 431, by: byServer},
		{name: "Basic and Bearer", header: "Authorization: Basic dXNlcjpwYXNz\r\n" + bearerLine,
			status: 200, by: byHandler, body: "key=one", userID: "one", apiKey: ok},
		{name: "empty bearer", header: "Authorization: Bearer \r\n",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "scheme without a space", header: "Authorization: Bearer" + e2eKey1 + "\r\n",
			status: 401, by: byHandler, challenge: challengeMissing, apiKey: e2eMissing},
		{name: "bearer in upper case", header: "Authorization: BEARER " + e2eKey1 + "\r\n",
			status: 200, by: byHandler, body: "key=one", userID: "one", apiKey: ok},
		{name: "bearer with a NUL key", header: "Authorization: Bearer a\x00b\r\n", status: 400, by: byServer},

		// Query.
		{name: "query parameter twice with one key", query: "?api_key=" + e2eKey1 + "&api_key=" + e2eKey1,
			status: 200, by: byHandler, body: "key=one", userID: "one", apiKey: ok},
		{name: "query parameter twice with two keys", query: "?api_key=" + e2eKey1 + "&api_key=other",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "percent-encoding %zz", query: "?api_key=%zz" + e2eKey1,
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "percent-encoding cut short", query: "?api_key=" + e2eKey1 + "%4",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "percent-encoding %zz in another parameter", query: "?x=%zz&api_key=" + e2eKey1,
			status: 200, by: byHandler, body: "key=one", userID: "one", apiKey: ok},
		{name: "percent-encoded NUL", query: "?api_key=" + e2eKey1 + "%00",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "empty query value", query: "?api_key=",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "percent-encoded parameter name", query: "?api%5Fkey=" + e2eKey1,
			status: 200, by: byHandler, body: "key=one", userID: "one", apiKey: ok},
		{name: "percent-encoding %zz in the path", raw: "GET {path}%zz HTTP/1.1\r\nHost: {host}\r\n" + bearerLine + "Connection: close\r\n\r\n",
			status: 400, by: byServer},

		// Two places at once.
		{name: "two different keys in two sources", query: "?api_key=other", header: bearerLine,
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},
		{name: "cookie with two keys", header: "Cookie: k=" + e2eKey1 + "; k=other\r\n",
			status: 401, by: byHandler, challenge: challengeInvalid, apiKey: e2eInvalid},

		// Not HTTP as it should be.
		{name: "no Host header", raw: "GET {path} HTTP/1.1\r\n" + bearerLine + "Connection: close\r\n\r\n",
			status: 400, by: byServer},
		{name: "header line without a colon", header: "X-API-Key " + e2eKey1 + "\r\n", status: 400, by: byServer},
		{name: "space before the colon", header: "X-API-Key : " + e2eKey1 + "\r\n", status: 400, by: byServer},
		{name: "garbage request line", raw: "NOT HTTP AT ALL, AND LONGER THAN 24 BYTES {path}\r\n\r\n", status: 400, by: byServer},
		// The one 5xx: RFC 9110 says 505, and Go's server says it before Caddy.
		{name: "unknown HTTP version", raw: "GET {path} HTTP/9.9\r\nHost: {host}\r\n" + bearerLine + "\r\n", status: 505, by: byServer},
	}

	c := e2eStart(t, "api_key {\n\tfrom bearer\n\tfrom header X-API-Key\n\tfrom query api_key\n\tfrom cookie k\n\tkey one "+e2eKey1+
		"\n\tmax_failures off\n}\nrespond \"key={http.api_key.id}\"")
	addr := strings.TrimPrefix(c.base, "http://")
	for i, rq := range rows {
		path := fmt.Sprintf("/r%d", i)
		t.Run(rq.name, func(t *testing.T) {
			raw := rq.raw
			if raw == "" {
				raw = "GET {path}" + rq.query + " HTTP/1.1\r\nHost: {host}\r\n" + rq.header + "Connection: close\r\n\r\n"
			}
			raw = strings.NewReplacer("{path}", path, "{host}", addr).Replace(raw)
			resp, body := hostileRaw(t, addr, raw)
			if resp.StatusCode != rq.status {
				t.Errorf("status = %d, want %d (body %q)", resp.StatusCode, rq.status, body)
			}
			if rq.body != "" && body != rq.body {
				t.Errorf("body = %q, want %q", body, rq.body)
			}
			if got := resp.Header.Values("WWW-Authenticate"); !slices.Equal(got, e2eOptional(rq.challenge)) {
				t.Errorf("WWW-Authenticate = %q, want %q", got, e2eOptional(rq.challenge))
			}
			if rq.by == byHandler {
				e := e2eWaitLog(t, c.accessLog, "request "+path, func(e e2eAccessEntry) bool {
					return e.Msg == "handled request" && hostilePathOf(e.Request.URI) == path
				})
				e2eCheckAccessEntry(t, e, rq.status, rq.userID, rq.apiKey)
			}
		})
	}

	// Go's server answered the others before Caddy saw them: no access
	// log line. The line of a later request shows that the log is
	// written up to here.
	if resp := c.get(t, "/after", bearer(e2eKey1)); resp.status != 200 || resp.body != "key=one" {
		t.Errorf("after the hostile requests: %d %q, want 200 key=one", resp.status, resp.body)
	}
	c.accessEntry(t, "/after")
	logged := make(map[string]bool)
	for _, e := range e2eReadLog[e2eAccessEntry](t, c.accessLog) {
		logged[hostilePathOf(e.Request.URI)] = true
	}
	for i, rq := range rows {
		if path := fmt.Sprintf("/r%d", i); rq.by == byServer && logged[path] {
			t.Errorf("%s: answered by %s, but the access log has a line for it", rq.name, byServer)
		}
	}
}

// TestHostileGuessing checks the brute-force guard over real HTTP: an
// address that keeps sending wrong keys gets 429 for any key, before any
// lookup.
func TestHostileGuessing(t *testing.T) {
	c := e2eStart(t, "api_key {\n\tkey one "+e2eKey1+"\n\tmax_failures 3/1m\n}\nrespond \"key={http.api_key.id}\"")
	// Requests without a key are not failures.
	for i := range 5 {
		e2eRequest{uri: fmt.Sprintf("/nokey%d", i), status: 401, challenge: `Bearer realm="api"`, apiKey: e2eMissing}.check(t, c)
	}
	for i := range 3 {
		e2eRequest{uri: fmt.Sprintf("/guess%d", i), header: bearer(fmt.Sprintf("guess-%d", i)), status: 401,
			challenge: `Bearer realm="api", error="invalid_token"`, apiKey: e2eInvalid}.check(t, c)
	}
	// Now the address is refused, whatever it sends.
	for _, rq := range []struct {
		uri    string
		header http.Header
	}{{"/good", bearer(e2eKey1)}, {"/guess3", bearer("guess-3")}, {"/nokey-blocked", nil}} {
		resp := c.get(t, rq.uri, rq.header)
		if resp.status != 429 {
			t.Errorf("%s after 3 failures: status %d, want 429", rq.uri, resp.status)
		}
		// One failure's worth of 3/1m is 20 s, counted from the first
		// guess on the real clock: a slow machine may have used a
		// second or two of it by now.
		if got := resp.header.Get("Retry-After"); got != "20" && got != "19" && got != "18" {
			t.Errorf("%s: Retry-After = %q, want 18 to 20 (one failure's worth of 3/1m)", rq.uri, got)
		}
		if got := resp.header.Values("WWW-Authenticate"); got != nil {
			t.Errorf("%s: WWW-Authenticate = %q on a 429, want none", rq.uri, got)
		}
		e2eCheckAccessEntry(t, c.accessEntry(t, rq.uri), 429, "", map[string]string{"outcome": "too_many_failures"})
	}
}

// TestHostileShortRequest sends a request shorter than HTTP/2's 24-byte
// preface. Caddy serves unencrypted HTTP/2 too, so Go's server waits for
// 24 bytes before it reads HTTP/1: it answers such a request (400) only at
// the read_header timeout (1 min by default; 1 s here).
func TestHostileShortRequest(t *testing.T) {
	c, err := e2eTryStartGlobal(t, "servers {\n\ttimeouts {\n\t\tread_header 1s\n\t}\n}",
		"api_key {\n\tkey one "+e2eKey1+"\n}\nrespond ok")
	if err != nil {
		t.Fatalf("loading config: %v", err)
	}
	start := time.Now()
	resp, _ := hostileRaw(t, strings.TrimPrefix(c.base, "http://"), "GET /x\r\n\r\n")
	if resp.StatusCode != 400 {
		t.Errorf("status = %d, want 400", resp.StatusCode)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Errorf("answered after %v, before the read_header timeout of 1 s", d)
	}
}

// hostileErrorLine is the part of an error log line the keys-file tests
// look at.
type hostileErrorLine struct {
	Level  string `json:"level"`
	Logger string `json:"logger"`
	Msg    string `json:"msg"`
	File   string `json:"file"`
	Error  string `json:"error"`
}

// hostileWaitReport waits for the keys-file watcher's report of a file it
// did not load, with an error that contains problem.
func hostileWaitReport(t *testing.T, c *e2eCaddy, file, problem string) {
	t.Helper()
	e2eWaitLog(t, c.errorLog, "a report of "+problem, func(e hostileErrorLine) bool {
		return e.Level == "error" && e.Logger == "http.handlers.api_key" &&
			e.Msg == "keys file not reloaded; the previous keys stay in use" &&
			e.File == file && strings.Contains(e.Error, problem)
	})
}

// hostileWaitStatus polls until a request with key gets want; the keys
// file's documented bound from write to effect is 5 s.
func hostileWaitStatus(t *testing.T, c *e2eCaddy, what, key string, want int) {
	t.Helper()
	start := time.Now()
	for {
		got := c.get(t, "/", bearer(key)).status
		if got == want {
			return
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%s: still %d after 5 s, want %d", what, got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// hostileStatus asserts the status of a request with key now.
func hostileStatus(t *testing.T, c *e2eCaddy, what, key string, want int) {
	t.Helper()
	if got := c.get(t, "/", bearer(key)).status; got != want {
		t.Errorf("%s: status %d, want %d", what, got, want)
	}
}

// hostileSymlink points link at target atomically: a new link renamed
// over the old one, as Kubernetes does with a ConfigMap's files.
func hostileSymlink(t *testing.T, target, link string) {
	t.Helper()
	tmp := link + ".new"
	if err := os.Symlink(target, tmp); err != nil {
		t.Skipf("symlinks not supported: %v", err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
}

// TestHostileKeysFileAtStart checks that a keys file that cannot be used
// stops the config from loading, with an error that names the file.
func TestHostileKeysFileAtStart(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, path string)
		problem string // what the error says after the file path; {path} is the path
	}{
		{
			name:    "0 bytes",
			setup:   func(t *testing.T, path string) { e2eWriteFile(t, path, nil) },
			problem: `file is empty; want {"keys": [...]}`,
		},
		{
			name:    "whitespace only",
			setup:   func(t *testing.T, path string) { e2eWriteFile(t, path, []byte(" \n\t\n")) },
			problem: `file is empty; want {"keys": [...]}`,
		},
		{
			name:    "missing",
			setup:   func(t *testing.T, path string) {},
			problem: "stat {path}: no such file or directory",
		},
		{
			name:    "dangling symlink",
			setup:   func(t *testing.T, path string) { hostileSymlink(t, filepath.Join(t.TempDir(), "gone.json"), path) },
			problem: "stat {path}: no such file or directory",
		},
		{
			name: "a directory",
			setup: func(t *testing.T, path string) {
				if err := os.Mkdir(path, 0o700); err != nil {
					t.Fatal(err)
				}
			},
			problem: "not a regular file (a directory)",
		},
		{
			// Reading one the ordinary way waits for a writer: Caddy
			// hung at start-up, deaf even to SIGTERM.
			name:    "a named pipe",
			setup:   hostileMkfifo,
			problem: "not a regular file (a named pipe)",
		},
		{
			name:    "NUL bytes",
			setup:   func(t *testing.T, path string) { e2eWriteFile(t, path, make([]byte, 64)) },
			problem: "invalid JSON at line 1, column 1: invalid character '\\x00' looking for beginning of value",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keys.json")
			tt.setup(t, path)
			_, err := e2eTryStart(t, "api_key {\n\tkeys_file "+path+"\n}\nrespond ok")
			if err == nil {
				t.Fatal("config loaded, want an error")
			}
			want := "provision http.handlers.api_key: loading keys file " + path + ": " + strings.ReplaceAll(tt.problem, "{path}", path)
			if !strings.HasSuffix(err.Error(), want) {
				t.Errorf("error = %v\nwant it to end with %s", err, want)
			}
		})
	}
}

// hostileMkfifo makes a named pipe at path, with mkfifo(1) so that the
// test builds where there is none (the test is then skipped).
func hostileMkfifo(t *testing.T, path string) {
	t.Helper()
	if _, err := exec.LookPath("mkfifo"); err != nil {
		t.Skip("no mkfifo here")
	}
	if out, err := exec.Command("mkfifo", path).CombinedOutput(); err != nil {
		t.Fatalf("mkfifo: %v: %s", err, out)
	}
}

// TestHostileKeysFileReload empties and deletes a keys file under a
// running Caddy: the keys in use keep serving, each problem is logged,
// and the file put back is loaded.
func TestHostileKeysFileReload(t *testing.T) {
	keysFile := filepath.Join(t.TempDir(), "keys.json")
	e2eWriteFile(t, keysFile, e2eKeysJSON(t, e2eKey{ID: "one", Key: e2eKey1}))
	c := e2eStart(t, "api_key {\n\tkeys_file "+keysFile+"\n\tmax_failures off\n}\nrespond \"key={http.api_key.id}\"")
	hostileStatus(t, c, "key one at start", e2eKey1, 200)

	// A field twice, which encoding/json alone reads as the last one:
	// the file is refused, not read as key one disabled.
	e2eWriteFile(t, keysFile, fmt.Appendf(nil, `{"keys": [{"id": "one", "hash": %q, "disabled": false, "disabled": true}]}`, e2eHash(e2eKey1)))
	hostileWaitReport(t, c, keysFile, "loading keys file "+keysFile+`: keys[0] (id "one"): "disabled" appears twice`)
	hostileStatus(t, c, "key one with a field twice in the file", e2eKey1, 200)

	// A named pipe behind the path: a read that waited for a writer would
	// hold the file's lock for ever, and config reloads with it.
	fifo := filepath.Join(t.TempDir(), "fifo")
	hostileMkfifo(t, fifo)
	hostileSymlink(t, fifo, keysFile)
	hostileWaitReport(t, c, keysFile, "loading keys file "+keysFile+": not a regular file (a named pipe)")
	hostileStatus(t, c, "key one with a named pipe for the file", e2eKey1, 200)
	c.reload(t, c.config)
	hostileStatus(t, c, "key one after a config reload with a named pipe for the file", e2eKey1, 200)

	e2eWriteFile(t, keysFile, nil)
	hostileWaitReport(t, c, keysFile, "loading keys file "+keysFile+`: file is empty; want {"keys": [...]}`)
	hostileStatus(t, c, "key one with the file empty", e2eKey1, 200)

	if err := os.Remove(keysFile); err != nil {
		t.Fatal(err)
	}
	hostileWaitReport(t, c, keysFile, "keys file "+keysFile+": stat "+keysFile+": no such file or directory")
	hostileStatus(t, c, "key one with the file gone", e2eKey1, 200)

	// A config reload with the file gone loads, and keeps the keys too.
	c.reload(t, c.config)
	hostileStatus(t, c, "key one after a config reload with the file gone", e2eKey1, 200)

	e2eWriteFile(t, keysFile, e2eKeysJSON(t, e2eKey{ID: "two", Key: e2eKey2}))
	hostileWaitStatus(t, c, "key two once the file is back", e2eKey2, 200)
	hostileStatus(t, c, "key one once the file is back without it", e2eKey1, 401)
}

// TestHostileKeysFileSymlink re-points a keys file that is a symlink, as
// Kubernetes does with the files of a ConfigMap.
func TestHostileKeysFileSymlink(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(dir, "keys.json")
	version := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		e2eWriteFile(t, path, data)
		return path
	}
	first := version("v1.json", e2eKeysJSON(t, e2eKey{ID: "one", Key: e2eKey1}))
	second := version("v2.json", e2eKeysJSON(t, e2eKey{ID: "two", Key: e2eKey2}))
	truncated := version("v3.json", []byte(`{"keys": [{"id": "three", "hash": "`))
	third := version("v4.json", e2eKeysJSON(t, e2eKey{ID: "three", Key: e2eKey3}))
	hostileSymlink(t, first, link)
	c := e2eStart(t, "api_key {\n\tkeys_file "+link+"\n\tmax_failures off\n}\nrespond \"key={http.api_key.id}\"")
	hostileStatus(t, c, "key one at start", e2eKey1, 200)

	hostileSymlink(t, second, link)
	hostileWaitStatus(t, c, "key two after the link moved to it", e2eKey2, 200)
	hostileStatus(t, c, "key one after the link moved away", e2eKey1, 401)

	hostileSymlink(t, truncated, link)
	hostileWaitReport(t, c, link, "loading keys file "+link+": keys[0]: unexpected end of file (truncated JSON?)")
	hostileStatus(t, c, "key two with the link on a broken file", e2eKey2, 200)
	hostileStatus(t, c, "key three with the link on a broken file", e2eKey3, 401)

	hostileSymlink(t, filepath.Join(dir, "gone.json"), link)
	hostileWaitReport(t, c, link, "keys file "+link+": stat "+link+": no such file or directory")
	hostileStatus(t, c, "key two with the link dangling", e2eKey2, 200)

	hostileSymlink(t, third, link)
	hostileWaitStatus(t, c, "key three after the link moved to it", e2eKey3, 200)
	hostileStatus(t, c, "key two after the link moved away", e2eKey2, 401)
}

// TestHostileKeysFile1M loads a keys file of a million entries (97 MiB)
// in a Caddy built from cmd/caddy, run as a process: in this test binary,
// under -race, parsing it would take most of a minute.
func TestHostileKeysFile1M(t *testing.T) {
	if testing.Short() {
		t.Skip("writes and loads a 97 MiB keys file; skipped with -short")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("go is not on PATH; cannot build bench/genkeys")
	}
	// The keys file is bench/run.sh's, from the same generator.
	dir := t.TempDir()
	genkeys, keys := filepath.Join(dir, "genkeys"), filepath.Join(dir, "keys.json")
	if out, err := exec.Command("go", "build", "-o", genkeys, "./bench/genkeys").CombinedOutput(); err != nil {
		t.Fatalf("go build ./bench/genkeys: %v\n%s", err, out)
	}
	if out, err := exec.Command(genkeys, "-n", "1000000", "-keys", keys).CombinedOutput(); err != nil {
		t.Fatalf("genkeys: %v\n%s", err, out)
	}
	e := procSetup(t, "api_key {\n\tkeys_file "+keys+"\n\tmax_failures off\n}\nrespond \"key={http.api_key.id}\"")
	// e.run allows 30 s; parsing a million keys on a busy machine may
	// take longer than that.
	probe := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	start := time.Now()
	c := e.start(t)
	for {
		resp, err := probe.Get(e.base + "/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("site answered %d without a key, want 401", resp.StatusCode)
			}
			break
		}
		select {
		case <-c.done:
			t.Fatalf("caddy exited before serving: %v", c.err)
		default:
		}
		if time.Since(start) > 2*time.Minute {
			t.Fatalf("caddy did not serve %s within 2 min: %v", e.base, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("a million keys: serving after %v", time.Since(start).Round(time.Millisecond))
	// bench/genkeys: key i is bench-<i, 9 digits>-0123456789abcdefghijklmnop, id k<i>.
	benchKey := func(i int) string { return fmt.Sprintf("bench-%09d-0123456789abcdefghijklmnop", i) }
	for _, tc := range []struct {
		key    string
		status int
		body   string
	}{
		{benchKey(0), 200, "key=k0"},
		{benchKey(999_999), 200, "key=k999999"},
		{benchKey(1_000_000), 401, ""},
	} {
		resp := c.get(t, "/", bearer(tc.key))
		if resp.status != tc.status || (tc.body != "" && resp.body != tc.body) {
			t.Errorf("key %s: %d %q, want %d %q", tc.key, resp.status, resp.body, tc.status, tc.body)
		}
	}
	c.stop(t)
}
