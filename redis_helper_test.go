package apikey

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestRedis is a redis-server run by a test, on a free loopback port, with
// nothing saved to disk. Stop and Start let a test take it away and bring
// it back on the same port.
type TestRedis struct {
	Addr string
	t    testing.TB
	dir  string
	cmd  *exec.Cmd
}

// StartTestRedis starts redis-server for the test and stops it when the
// test ends. Without redis-server on PATH the test is skipped, or fails
// when APIKEY_REQUIRE_REDIS=1 (as in CI, which installs it).
func StartTestRedis(t testing.TB) *TestRedis {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("APIKEY_REQUIRE_REDIS") == "1" {
			t.Fatalf("redis-server not found, and APIKEY_REQUIRE_REDIS=1: %v", err)
		}
		t.Skip("redis-server not found on PATH (apt-get install -y redis-server); skipping a test against a real Redis")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	r := &TestRedis{Addr: "127.0.0.1:" + strconv.Itoa(port), t: t, dir: t.TempDir()}
	r.Start()
	t.Cleanup(r.Stop)
	return r
}

// Start runs redis-server (again) and waits until it answers.
func (r *TestRedis) Start() {
	r.t.Helper()
	port := r.Addr[strings.LastIndexByte(r.Addr, ':')+1:]
	r.cmd = exec.Command("redis-server", "--bind", "127.0.0.1", "--port", port,
		"--save", "", "--appendonly", "no", "--dir", r.dir, "--logfile", filepath.Join(r.dir, "redis.log"))
	ownProcessGroup(r.cmd)
	if err := r.cmd.Start(); err != nil {
		r.t.Fatalf("starting redis-server: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := r.ping(); err == nil {
			return
		} else if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(r.dir, "redis.log"))
			r.t.Fatalf("redis-server on %s did not answer within 10s: %v\n%s", r.Addr, err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop kills redis-server and waits for it to exit; its data is gone.
func (r *TestRedis) Stop() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	_ = r.cmd.Wait()
	r.cmd = nil
}

// ping sends PING over a plain connection and expects +PONG.
func (r *TestRedis) ping() error {
	c, err := net.DialTimeout("tcp", r.Addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := fmt.Fprint(c, "PING\r\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}
