package apikey_test

import (
	"bytes"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// These tests build cmd/caddy and run it as a child process, so that
// what only a real process has (signals, a restart that reads its state
// back, a second process editing the keys file) is tested as operators
// meet it. Each process gets its own data and config directories and
// loopback ports.

// procBuild is the caddy binary, built once per test binary.
var procBuild struct {
	once sync.Once
	path string
	err  error
}

// procBinary returns the path of a caddy binary built from ./cmd/caddy.
// It goes under the data directory that TestMain makes (and removes) for
// the whole test binary, so that nothing is left behind.
func procBinary(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go is not on PATH; cannot build cmd/caddy")
	}
	procBuild.once.Do(func() {
		dir := os.Getenv("XDG_DATA_HOME")
		if dir == "" {
			if dir, procBuild.err = os.MkdirTemp("", "apikey-caddy-"); procBuild.err != nil {
				return
			}
		}
		procBuild.path = filepath.Join(dir, "bin", "caddy")
		cmd := exec.Command(goTool, "build", "-o", procBuild.path, "./cmd/caddy")
		if out, err := cmd.CombinedOutput(); err != nil {
			procBuild.err = fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
		}
	})
	if procBuild.err != nil {
		t.Fatal(procBuild.err)
	}
	return procBuild.path
}

// procEnv is a Caddy's environment: its own data and config directories.
type procEnv struct {
	bin       string
	dataHome  string // XDG_DATA_HOME; Caddy's data directory is dataHome/caddy
	output    string // stdout and stderr of every process, appended
	caddyfile string
	port      int
	base      string // http://127.0.0.1:<port>
	accessLog string
}

// procSetup makes the directories, the ports and a Caddyfile with one
// site whose body is site; ACCESS_LOG_FILE in site stands for the access
// log's path. The output of every process it runs is printed if the test
// fails.
func procSetup(t *testing.T, site string) *procEnv {
	t.Helper()
	dir := t.TempDir()
	e := &procEnv{
		bin:       procBinary(t),
		dataHome:  filepath.Join(dir, "data"),
		output:    filepath.Join(dir, "output.log"),
		caddyfile: filepath.Join(dir, "Caddyfile"),
		port:      e2eFreePort(t),
		accessLog: filepath.Join(dir, "access.log"),
	}
	e.base = "http://127.0.0.1:" + strconv.Itoa(e.port)
	for _, d := range []string{e.dataHome, filepath.Join(dir, "config")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	site = strings.ReplaceAll(site, e2eAccessLogToken, e.accessLog)
	site = "\t" + strings.ReplaceAll(strings.TrimSpace(site), "\n", "\n\t")
	caddyfile := fmt.Sprintf("{\n\tadmin 127.0.0.1:%d\n}\n\nhttp://127.0.0.1:%d {\n%s\n}\n", e2eFreePort(t), e.port, site)
	if err := os.WriteFile(e.caddyfile, []byte(caddyfile), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		out, _ := os.ReadFile(e.output)
		t.Logf("Caddyfile:\n%s\noutput of the caddy processes:\n%s", caddyfile, out)
	})
	return e
}

// environ is the environment of the processes, XDG directories pointed
// into the test's directory (later entries win in exec).
func (e *procEnv) environ() []string {
	return append(os.Environ(),
		"XDG_DATA_HOME="+e.dataHome,
		"XDG_CONFIG_HOME="+filepath.Join(filepath.Dir(e.dataHome), "config"))
}

// procCaddy is one running caddy process.
type procCaddy struct {
	env    *procEnv
	cmd    *exec.Cmd
	done   chan struct{} // closed when the process has exited
	err    error         // what Wait returned, once done is closed
	client *http.Client
}

// start runs caddy run with e's Caddyfile, without waiting for it to
// serve. The process is killed when the test ends, if it still runs.
func (e *procEnv) start(t *testing.T) *procCaddy {
	t.Helper()
	out, err := os.OpenFile(e.output, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	fmt.Fprintf(out, "=== caddy run (%s)\n", time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(e.bin, "run", "--config", e.caddyfile, "--adapter", "caddyfile")
	cmd.Env = e.environ()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting caddy: %v", err)
	}
	c := &procCaddy{env: e, cmd: cmd, done: make(chan struct{}), client: e2eClient(t)}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		select {
		case <-c.done:
		default:
			_ = cmd.Process.Kill()
			<-c.done
		}
	})
	return c
}

// run starts caddy and waits until the site answers.
func (e *procEnv) run(t *testing.T) *procCaddy {
	t.Helper()
	c := e.start(t)
	probe := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-c.done:
			t.Fatalf("caddy exited before serving: %v", c.err)
		default:
		}
		resp, err := probe.Get(e.base + "/")
		if err == nil {
			resp.Body.Close()
			// The api_key handler answers a request without a key.
			if resp.StatusCode == http.StatusUnauthorized {
				return c
			}
			t.Fatalf("site answered %d without a key, want 401", resp.StatusCode)
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy did not serve %s within 30 s: %v", e.base, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wait waits up to 30 s for the process to exit and returns its exit code.
func (c *procCaddy) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
		t.Fatalf("caddy did not exit within 30 s")
	}
	c.client.CloseIdleConnections()
	return c.cmd.ProcessState.ExitCode()
}

// stop sends SIGTERM, Caddy's graceful shutdown, and checks that the
// process exits with status 0.
func (c *procCaddy) stop(t *testing.T) {
	t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	if code := c.wait(t); code != 0 {
		t.Fatalf("caddy exited with status %d after SIGTERM, want 0 (%v)", code, c.err)
	}
}

// kill sends SIGKILL: no shutdown, no last flush.
func (c *procCaddy) kill(t *testing.T) {
	t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL: %v", err)
	}
	c.wait(t)
}

func (c *procCaddy) get(t *testing.T, uri string, header http.Header) e2eResponse {
	t.Helper()
	return e2eGet(t, c.client, c.env.base+uri, header)
}

var procQuotaRe = regexp.MustCompile(`"quota";r=(\d+);t=(\d+)`)

// procQuotaLeft reads the r of the quota in a RateLimit header.
func procQuotaLeft(t *testing.T, resp e2eResponse) int64 {
	t.Helper()
	v := resp.header.Get("RateLimit")
	m := procQuotaRe.FindStringSubmatch(v)
	if m == nil {
		t.Fatalf("RateLimit = %q (status %d), want a \"quota\" item", v, resp.status)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}

// procSameDay skips the test if a UTC day ended while it ran: a daily
// quota starts again from zero then, and the counts it checks would not
// add up.
func procSameDay(t *testing.T, start time.Time) {
	t.Helper()
	if now := time.Now().UTC(); now.YearDay() != start.UTC().YearDay() {
		t.Skip("a UTC day ended during the test; daily quota counts started again")
	}
}

// procKeysFile writes a keys file with keys and returns its path.
func procKeysFile(t *testing.T, keys ...e2eKey) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys.json")
	if err := os.WriteFile(path, e2eKeysJSON(t, keys...), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// procAdmit sends n requests with key, each of which must be admitted,
// and checks the quota left after each: left0, left0-1, ...
func procAdmit(t *testing.T, c *procCaddy, key string, n int, left0 int64) {
	t.Helper()
	for i := range n {
		resp := c.get(t, fmt.Sprintf("/admit?i=%d", i), bearer(key))
		if resp.status != http.StatusOK || resp.body != "ok" {
			t.Fatalf("request %d: status %d body %q, want 200 ok", i, resp.status, resp.body)
		}
		if got, want := procQuotaLeft(t, resp), left0-int64(i); got != want {
			t.Fatalf("request %d: quota left %d, want %d", i, got, want)
		}
	}
}

func TestProcessQuotaSurvivesSIGTERM(t *testing.T) {
	start := time.Now()
	keys := procKeysFile(t, e2eKey{ID: "one", Key: e2eKey1})
	e := procSetup(t, fmt.Sprintf("api_key {\n\tkeys_file %s\n\tquota 1000/day\n}\nrespond \"ok\"", keys))

	c := e.run(t)
	procAdmit(t, c, e2eKey1, 7, 999)
	c.stop(t)

	store := filepath.Join(e.dataHome, "caddy", "api_key", "quotas.db")
	if fi, err := os.Stat(store); err != nil || fi.Size() == 0 {
		t.Fatalf("no quota store at %s after shutdown (%v)", store, err)
	}

	c = e.run(t)
	resp := c.get(t, "/after-restart", bearer(e2eKey1))
	procSameDay(t, start)
	if resp.status != http.StatusOK {
		t.Fatalf("status after restart = %d, want 200", resp.status)
	}
	if got := procQuotaLeft(t, resp); got != 992 {
		t.Errorf("quota left after 7 calls, a restart and 1 call = %d, want 992 (1000-8)", got)
	}
	if got, want := resp.header.Get("RateLimit-Policy"), `"quota";q=1000;w=86400`; got != want {
		t.Errorf("RateLimit-Policy = %q, want %q", got, want)
	}
	c.stop(t)
}

func TestProcessQuotaAfterSIGKILL(t *testing.T) {
	start := time.Now()
	keys := procKeysFile(t, e2eKey{ID: "one", Key: e2eKey1})
	e := procSetup(t, fmt.Sprintf("api_key {\n\tkeys_file %s\n\tquota 1000/day\n}\nrespond \"ok\"", keys))

	c := e.run(t)
	const flushed, unflushed = 5, 3
	procAdmit(t, c, e2eKey1, flushed, 999)
	// More than the one-second flush interval: these counts are on disk.
	time.Sleep(1500 * time.Millisecond)
	procAdmit(t, c, e2eKey1, unflushed, 999-flushed)
	c.kill(t)

	c = e.run(t)
	resp := c.get(t, "/after-kill", bearer(e2eKey1))
	procSameDay(t, start)
	if resp.status != http.StatusOK {
		t.Fatalf("status after restart = %d, want 200", resp.status)
	}
	// Used now counts this request too. At most the calls since the last
	// flush may be lost, never those before it.
	used := 1000 - procQuotaLeft(t, resp)
	if lo, hi := int64(flushed+1), int64(flushed+unflushed+1); used < lo || used > hi {
		t.Errorf("used after SIGKILL and restart = %d, want %d to %d (at most one flush interval lost)", used, lo, hi)
	}
	t.Logf("used after restart: %d of %d calls (%d lost)", used, flushed+unflushed+1, flushed+unflushed+1-used)
	c.stop(t)
}

func TestProcessQuotaExhaustedAfterRestart(t *testing.T) {
	start := time.Now()
	keys := procKeysFile(t, e2eKey{ID: "one", Key: e2eKey1})
	e := procSetup(t, fmt.Sprintf("log {\n\toutput file %s\n\tformat json\n}\napi_key {\n\tkeys_file %s\n\tquota 3/day\n}\nrespond \"ok\"",
		e2eAccessLogToken, keys))

	c := e.run(t)
	procAdmit(t, c, e2eKey1, 3, 2)
	c.stop(t)

	c = e.run(t)
	resp := c.get(t, "/fourth", bearer(e2eKey1))
	procSameDay(t, start)
	if resp.status != http.StatusTooManyRequests {
		t.Fatalf("4th call after restart: status %d body %q, want 429", resp.status, resp.body)
	}
	retry, err := strconv.Atoi(resp.header.Get("Retry-After"))
	if err != nil || retry <= 0 || retry > 86400 {
		t.Errorf("Retry-After = %q, want 1 to 86400 seconds", resp.header.Get("Retry-After"))
	}
	if got := procQuotaLeft(t, resp); got != 0 {
		t.Errorf("quota left = %d, want 0", got)
	}
	entry := e2eWaitLog(t, e.accessLog, "request /fourth", func(a e2eAccessEntry) bool {
		return a.Msg == "handled request" && a.Request.URI == "/fourth"
	})
	e2eCheckAccessEntry(t, entry, http.StatusTooManyRequests, "one", map[string]string{"id": "one", "outcome": "quota_exceeded"})
	c.stop(t)
}

func TestProcessCorruptQuotaStore(t *testing.T) {
	keys := procKeysFile(t, e2eKey{ID: "one", Key: e2eKey1})
	e := procSetup(t, fmt.Sprintf("api_key {\n\tkeys_file %s\n\tquota 10/day\n}\nrespond \"ok\"", keys))
	store := filepath.Join(e.dataHome, "caddy", "api_key", "quotas.db")
	if err := os.MkdirAll(filepath.Dir(store), 0o700); err != nil {
		t.Fatal(err)
	}
	garbage := bytes.Repeat([]byte("this is not a bbolt database\x00\xff\n"), 1024)
	if err := os.WriteFile(store, garbage, 0o600); err != nil {
		t.Fatal(err)
	}

	c := e.start(t)
	code := c.wait(t)
	if code == 0 {
		t.Errorf("caddy run with a corrupt quota store exited with status 0, want an error")
	}
	out, err := os.ReadFile(e.output)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out, []byte(store)) {
		t.Errorf("output does not name the quota store %s:\n%s", store, out)
	}
	// Never a silent reset: the file is as it was.
	if got, err := os.ReadFile(store); err != nil || !bytes.Equal(got, garbage) {
		t.Errorf("the corrupt store was changed or removed (%v)", err)
	}
	// And the site never served.
	if _, err := (&http.Client{Timeout: time.Second}).Get(e.base + "/"); err == nil {
		t.Errorf("something answers on %s after a failed start", e.base)
	}
}

// apiKey runs the built binary's api-key command and returns its standard
// output; it fails the test unless the command exits 0.
func (e *procEnv) apiKey(t *testing.T, args ...string) (stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(e.bin, append([]string{"api-key"}, args...)...)
	cmd.Env = e.environ()
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("caddy api-key %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String(), errOut.String()
}

// procAwait polls uri with header every 100 ms until it gets status, for up
// to 6 s (a keys-file change takes effect within 5 s), and returns that
// response.
func procAwait(t *testing.T, c *procCaddy, uri string, header http.Header, status int) e2eResponse {
	t.Helper()
	deadline := time.Now().Add(6 * time.Second)
	for i := 0; ; i++ {
		resp := c.get(t, fmt.Sprintf("%s?poll=%d", uri, i), header)
		if resp.status == status {
			return resp
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still gets %d (body %q), want %d", uri, resp.status, resp.body, status)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// procHammer sends requests with key until stop is closed and counts them
// and those that did not get 200 ok.
type procHammer struct {
	stop    chan struct{}
	done    chan struct{}
	total   atomic.Int64
	bad     atomic.Int64
	mu      sync.Mutex
	samples []string // the first few bad answers
}

func procStartHammer(t *testing.T, base, key string) *procHammer {
	t.Helper()
	h := &procHammer{stop: make(chan struct{}), done: make(chan struct{})}
	client := e2eClient(t)
	go func() {
		defer close(h.done)
		for i := 0; ; i++ {
			select {
			case <-h.stop:
				return
			default:
			}
			status, body, err := procGetStatus(client, fmt.Sprintf("%s/steady?i=%d", base, i), key)
			h.total.Add(1)
			if err != nil || status != http.StatusOK || body != "ok" {
				h.bad.Add(1)
				h.mu.Lock()
				if len(h.samples) < 5 {
					h.samples = append(h.samples, fmt.Sprintf("request %d: status %d body %q err %v", i, status, body, err))
				}
				h.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { h.finish() })
	return h
}

func (h *procHammer) finish() {
	select {
	case <-h.stop:
	default:
		close(h.stop)
	}
	<-h.done
}

// procGetStatus is a GET that reports errors instead of failing a test, for
// use off the test's goroutine.
func procGetStatus(client *http.Client, url, key string) (int, string, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	var body bytes.Buffer
	_, err = body.ReadFrom(resp.Body)
	return resp.StatusCode, body.String(), err
}

func TestProcessCLIEditsWhileRunning(t *testing.T) {
	keys := procKeysFile(t, e2eKey{ID: "steady", Key: e2eKey2})
	e := procSetup(t, fmt.Sprintf("log {\n\toutput file %s\n\tformat json\n}\napi_key {\n\tkeys_file %s\n\tprefix sk\n}\nrespond \"ok\"",
		e2eAccessLogToken, keys))
	c := e.run(t)
	hammer := procStartHammer(t, e.base, e2eKey2)

	stdout, stderr := e.apiKey(t, "generate", "--keys-file", keys, "--id", "new1", "--prefix", "sk", "--owner", "acme")
	lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "sk_") {
		t.Fatalf("generate printed %q, want a sk_ key and a record", stdout)
	}
	key := lines[0]
	if strings.Contains(stderr, key) {
		t.Errorf("generate's stderr holds the key: %q", stderr)
	}
	if data, err := os.ReadFile(keys); err != nil || bytes.Contains(data, []byte(key)) || !bytes.Contains(data, []byte(e2eHash(key))) {
		t.Fatalf("keys file after generate (%v) lacks the key's hash or holds the key:\n%s", err, data)
	}

	procAwait(t, c, "/new", bearer(key), http.StatusOK)
	added := e2eWaitLog(t, e.accessLog, "an admitted request with new1", func(a e2eAccessEntry) bool {
		return strings.HasPrefix(a.Request.URI, "/new?") && a.Status == http.StatusOK
	})
	e2eCheckAccessEntry(t, added, http.StatusOK, "new1", e2eOK("new1"))

	e.apiKey(t, "disable", "--keys-file", keys, "--id", "new1")
	resp := procAwait(t, c, "/disabled", bearer(key), http.StatusUnauthorized)
	if got, want := resp.header.Get("WWW-Authenticate"), `Bearer realm="api", error="invalid_token"`; got != want {
		t.Errorf("WWW-Authenticate of a disabled key = %q, want %q", got, want)
	}
	disabled := e2eWaitLog(t, e.accessLog, "a refused request with new1", func(a e2eAccessEntry) bool {
		return strings.HasPrefix(a.Request.URI, "/disabled?") && a.Status == http.StatusUnauthorized
	})
	e2eCheckAccessEntry(t, disabled, http.StatusUnauthorized, "new1", map[string]string{"id": "new1", "outcome": "disabled"})

	e.apiKey(t, "enable", "--keys-file", keys, "--id", "new1")
	procAwait(t, c, "/enabled", bearer(key), http.StatusOK)

	e.apiKey(t, "remove", "--keys-file", keys, "--id", "new1")
	procAwait(t, c, "/removed", bearer(key), http.StatusUnauthorized)
	removed := e2eWaitLog(t, e.accessLog, "a request with the removed key", func(a e2eAccessEntry) bool {
		return strings.HasPrefix(a.Request.URI, "/removed?") && a.Status == http.StatusUnauthorized
	})
	if !maps.Equal(removed.APIKey, e2eInvalid) {
		t.Errorf("log api_key of the removed key = %v, want %v", removed.APIKey, e2eInvalid)
	}

	// The steady key is still in the file, byte for byte as written.
	if data, err := os.ReadFile(keys); err != nil || bytes.Contains(data, []byte(`"new1"`)) || !bytes.Contains(data, []byte(e2eHash(e2eKey2))) {
		t.Errorf("keys file after remove (%v):\n%s", err, data)
	}

	hammer.finish()
	if n := hammer.total.Load(); n < 10 {
		t.Errorf("only %d requests with the steady key were sent", n)
	}
	if bad := hammer.bad.Load(); bad != 0 {
		t.Errorf("%d of %d requests with the steady key did not get 200 ok: %s", bad, hammer.total.Load(), strings.Join(hammer.samples, "; "))
	}
	t.Logf("%d requests with the steady key during the edits", hammer.total.Load())
	c.stop(t)
}
