package apikey

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/redis/go-redis/v9"
	"github.com/spf13/cobra"
)

// These tests run the api-key subcommands with --redis against a real
// redis-server (StartTestRedis), in process as cli_test.go does, and look
// at what they left in Redis with a client of their own.

// cliRedisClient is a test's own connection to srv, for setting up and
// inspecting; it is closed when the test ends.
func cliRedisClient(t *testing.T, addr string) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	t.Cleanup(func() { c.Close() })
	return c
}

// cliFlush empties Redis, so that each subtest starts from nothing.
func cliFlush(t *testing.T, c *redis.Client) {
	t.Helper()
	if err := c.FlushAll(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
}

// cliRedisDump is everything in Redis: each key with its value, a hash's
// fields as JSON (sorted by name).
func cliRedisDump(t *testing.T, c *redis.Client) map[string]string {
	t.Helper()
	ctx := context.Background()
	keys, err := c.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	dump := make(map[string]string, len(keys))
	for _, k := range keys {
		switch typ := c.Type(ctx, k).Val(); typ {
		case "string":
			dump[k] = c.Get(ctx, k).Val()
		case "hash":
			b, _ := json.Marshal(c.HGetAll(ctx, k).Val())
			dump[k] = string(b)
		default:
			dump[k] = "(" + typ + ")"
		}
	}
	return dump
}

// cliSubscribe subscribes to channel and waits until Redis confirms it, so
// that nothing published afterwards is missed.
func cliSubscribe(t *testing.T, c *redis.Client, channel string) *redis.PubSub {
	t.Helper()
	ps := c.Subscribe(context.Background(), channel)
	t.Cleanup(func() { ps.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatalf("subscribing to %s: %v", channel, err)
	}
	return ps
}

// cliExpectPublished asserts that the messages want, and then nothing
// else, were published on ps.
func cliExpectPublished(t *testing.T, ps *redis.PubSub, want ...string) {
	t.Helper()
	var got []string
	for range want {
		msg, err := ps.ReceiveTimeout(context.Background(), 2*time.Second)
		if err != nil {
			t.Errorf("published %q, want %q (then: %v)", got, want, err)
			return
		}
		if m, ok := msg.(*redis.Message); ok {
			got = append(got, m.Payload)
		} else {
			t.Errorf("unexpected pub/sub message %T %v", msg, msg)
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("published %q, want %q", got, want)
	}
	if msg, err := ps.ReceiveTimeout(context.Background(), 150*time.Millisecond); err == nil {
		t.Errorf("published more than %q: %v", want, msg)
	}
}

// cliHex is the Redis form of the digest of key: the hex digits of its
// keys-file hash.
func cliHex(key string) string { return strings.TrimPrefix(cliHash(key), "sha256:") }

var (
	cliRAlpha = `{"id":"alpha","hash":"` + cliHash("r-alpha") + `","name":"Alpha","owner":"acme","plan":"gold",` +
		`"rate":"10/1m","burst":5,"metadata":{"tier":"1"},"allow_ips":["10.0.0.0/8"],"allow_methods":["GET"]}`
	// bravo's hash is in capitals, as a keys file may have it.
	cliRBravo   = `{"id":"bravo","hash":"SHA256:` + strings.ToUpper(cliHex("r-bravo")) + `"}`
	cliRCharlie = `{"id":"charlie","hash":"` + cliHash("r-charlie") + `","disabled":true,"expires":"2099-01-01T00:00:00Z","quota":"100/day"}`
)

func cliRFile(entries ...string) string {
	return `{"keys": [` + strings.Join(entries, ",\n") + `]}`
}

// cliWriteKeys writes a keys file into a fresh directory.
func cliWriteKeys(t *testing.T, data string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys.json")
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// cliRedisEntry reads the record of the key with hexDigest back as the
// handler does: entryFromHash, then record().
func cliRedisEntry(t *testing.T, c *redis.Client, prefix, hexDigest string) (keyFileEntry, *keyRecord) {
	t.Helper()
	fields, err := c.HGetAll(context.Background(), prefix+"key:"+hexDigest).Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(fields) == 0 {
		t.Fatalf("no record at %skey:%s", prefix, hexDigest)
	}
	if _, ok := fields["hash"]; ok {
		t.Errorf("record has a hash field: %v", fields)
	}
	e, err := entryFromHash(hexDigest, fields)
	if err != nil {
		t.Fatalf("entryFromHash refuses the record %v: %v", fields, err)
	}
	rec, err := e.record()
	if err != nil {
		t.Fatalf("record() refuses the record %v: %v", fields, err)
	}
	return e, rec
}

func TestCLIRedisGenerate(t *testing.T) {
	srv := StartTestRedis(t)
	c := cliRedisClient(t, srv.Addr)
	tests := []struct {
		name   string
		args   []string
		prefix string            // the Redis key prefix
		want   map[string]string // the printed record, less hash (and a default id)
	}{
		{
			name:   "defaults",
			prefix: "apikey:",
			want:   map[string]string{},
		},
		{
			name:   "all fields",
			args:   []string{"--prefix", "sk_live", "--id", "acme-prod", "--name", "Acme production", "--owner", "acme", "--plan", "gold", "--expires", "2031-06-01T12:00:00Z"},
			prefix: "apikey:",
			want:   map[string]string{"id": "acme-prod", "name": "Acme production", "owner": "acme", "plan": "gold", "expires": "2031-06-01T12:00:00Z"},
		},
		{
			name:   "key prefix",
			args:   []string{"--id", "t1", "--redis-key-prefix", "tenant1:"},
			prefix: "tenant1:",
			want:   map[string]string{"id": "t1"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cliFlush(t, c)
			ps := cliSubscribe(t, c, tt.prefix+"events")
			stdout, stderr, err := cliRun(t, generateCommand(), "", append([]string{"--redis", srv.Addr}, tt.args...)...)
			if err != nil {
				t.Fatalf("generate: %v (stderr %q)", err, stderr)
			}
			key, printed, _ := cliGenerated(t, stdout)
			want := maps.Clone(tt.want)
			want["hash"] = cliHash(key)
			if _, ok := want["id"]; !ok {
				want["id"] = printed["id"]
			}
			if !maps.Equal(printed, want) {
				t.Errorf("printed record = %v, want %v", printed, want)
			}
			hexDigest := cliHex(key)
			e, rec := cliRedisEntry(t, c, tt.prefix, hexDigest)
			if rec.id != want["id"] {
				t.Errorf("record id in Redis = %q, want %q", rec.id, want["id"])
			}
			// The record in Redis is the printed one.
			b, _ := json.Marshal(e)
			var stored map[string]string
			if err := json.Unmarshal(b, &stored); err != nil {
				t.Fatalf("entry from Redis %s: %v", b, err)
			}
			if !maps.Equal(stored, want) {
				t.Errorf("record in Redis = %v, want %v", stored, want)
			}
			dump := cliRedisDump(t, c)
			if got := dump[tt.prefix+"id:"+want["id"]]; got != hexDigest {
				t.Errorf("id index %sid:%s = %q, want the hex digest %q", tt.prefix, want["id"], got, hexDigest)
			}
			if len(dump) != 2 {
				t.Errorf("Redis holds %d keys, want 2 (record and id index): %v", len(dump), dump)
			}
			for k, v := range dump {
				if strings.Contains(k, key) || strings.Contains(v, key) {
					t.Errorf("Redis holds the key itself at %s", k)
				}
			}
			cliExpectPublished(t, ps, hexDigest)
			if wantErr := `added key "` + want["id"] + `" to redis ` + srv.Addr + "\n"; stderr != wantErr {
				t.Errorf("stderr = %q, want %q", stderr, wantErr)
			}
		})
	}
}

func TestCLIRedisGenerateRefused(t *testing.T) {
	srv := StartTestRedis(t)
	c := cliRedisClient(t, srv.Addr)
	ctx := context.Background()
	const password = "pw-Zq7-never-shown"
	tests := []struct {
		name    string
		setup   func(t *testing.T) []string // extra arguments
		wantErr []string
	}{
		{
			name: "duplicate id",
			setup: func(t *testing.T) []string {
				if _, stderr, err := cliRun(t, generateCommand(), "", "--redis", srv.Addr, "--id", "acme"); err != nil {
					t.Fatalf("first generate: %v (%s)", err, stderr)
				}
				return nil
			},
			wantErr: []string{`"acme"`, "id already in Redis"},
		},
		{
			// A user that may not HSET: the id is reserved, the record
			// cannot be written, and the reservation must go again.
			name: "record write fails",
			setup: func(t *testing.T) []string {
				if err := c.Do(ctx, "ACL", "SETUSER", "nohset", "reset", "on", ">"+password, "~*", "&*", "+@all", "-hset").Err(); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Do(ctx, "ACL", "DELUSER", "nohset") })
				return []string{"--redis-username", "nohset", "--redis-password", password}
			},
			wantErr: []string{`writing key "acme"`, "can't run this command"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cliFlush(t, c)
			extra := tt.setup(t)
			before := cliRedisDump(t, c)
			ps := cliSubscribe(t, c, "apikey:events")
			args := append([]string{"--redis", srv.Addr, "--id", "acme"}, extra...)
			stdout, _, err := cliRun(t, generateCommand(), "", args...)
			if err == nil {
				t.Fatalf("generate succeeded")
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
			if strings.Contains(err.Error(), password) {
				t.Errorf("error shows the password: %q", err)
			}
			if stdout != "" {
				t.Errorf("a refused key was printed: %q", stdout)
			}
			if after := cliRedisDump(t, c); !maps.Equal(after, before) {
				t.Errorf("Redis changed:\n%v\nwant\n%v", after, before)
			}
			cliExpectPublished(t, ps)
		})
	}
}

func TestCLIRedisImport(t *testing.T) {
	srv := StartTestRedis(t)
	c := cliRedisClient(t, srv.Addr)
	ctx := context.Background()
	hA, hB, hC, hX := cliHex("r-alpha"), cliHex("r-bravo"), cliHex("r-charlie"), cliHex("r-x")
	tests := []struct {
		name      string
		pre       []string // entries imported first
		file      string
		wantErr   string   // "" for success
		wantOut   string   // stdout
		wantLog   []string // in stderr
		published []string
		check     func(t *testing.T, before map[string]string)
	}{
		{
			name:      "good file",
			file:      cliRFile(cliRAlpha, cliRBravo, cliRCharlie),
			wantOut:   "imported 3, updated 0, refused 0\n",
			published: []string{hA, hB, hC},
			check: func(t *testing.T, _ map[string]string) {
				var file struct{ Keys []keyFileEntry }
				if err := json.Unmarshal([]byte(cliRFile(cliRAlpha, cliRBravo, cliRCharlie)), &file); err != nil {
					t.Fatal(err)
				}
				for i, h := range []string{hA, hB, hC} {
					want := file.Keys[i]
					want.Hash = "sha256:" + h
					got, _ := cliRedisEntry(t, c, "apikey:", h)
					if !reflect.DeepEqual(got, want) {
						t.Errorf("entry %s in Redis = %+v, want %+v", want.ID, got, want)
					}
					if idx := c.Get(ctx, "apikey:id:"+want.ID).Val(); idx != h {
						t.Errorf("id index of %s = %q, want %q", want.ID, idx, h)
					}
				}
				if n := c.DBSize(ctx).Val(); n != 6 {
					t.Errorf("Redis holds %d keys, want 6", n)
				}
			},
		},
		{
			name:    "bad hash: nothing written",
			file:    cliRFile(cliRAlpha, `{"id":"bravo","hash":"sha256:abc"}`, cliRCharlie),
			wantErr: "keys[1]",
		},
		{
			name:    "duplicate id: nothing written",
			file:    cliRFile(cliRAlpha, cliRBravo, `{"id":"alpha","hash":"`+cliHash("r-other")+`"}`),
			wantErr: "duplicate id",
		},
		{
			name:    "not a keys file",
			pre:     []string{cliRBravo},
			file:    `{"keys": [`,
			wantErr: "nothing imported",
		},
		{
			name:      "same id, same hash: updated, absent fields removed",
			pre:       []string{cliRAlpha},
			file:      cliRFile(`{"id":"alpha","hash":"sha256:`+hA+`","name":"Alpha 2","disabled":true}`, cliRBravo),
			wantOut:   "imported 1, updated 1, refused 0\n",
			published: []string{hA, hB},
			check: func(t *testing.T, _ map[string]string) {
				got := c.HGetAll(ctx, "apikey:key:"+hA).Val()
				want := map[string]string{"id": "alpha", "name": "Alpha 2", "disabled": "true"}
				if !maps.Equal(got, want) {
					t.Errorf("alpha's record = %v, want exactly %v", got, want)
				}
				if _, rec := cliRedisEntry(t, c, "apikey:", hA); !rec.disabled || rec.plan != "" {
					t.Errorf("alpha after update: disabled %v, plan %q; want true and none", rec.disabled, rec.plan)
				}
			},
		},
		{
			name:      "same id, other hash: refused, the others imported",
			pre:       []string{`{"id":"bravo","hash":"sha256:` + hX + `"}`},
			file:      cliRFile(cliRAlpha, cliRBravo, cliRCharlie),
			wantErr:   "1 of 3 keys refused",
			wantOut:   "imported 2, updated 0, refused 1\n",
			wantLog:   []string{`keys[1] (id "bravo"): refused: id already in Redis, with another hash`},
			published: []string{hA, hC},
			check: func(t *testing.T, before map[string]string) {
				if idx := c.Get(ctx, "apikey:id:bravo").Val(); idx != hX {
					t.Errorf("bravo's id index = %q, want the old %q", idx, hX)
				}
				if before["apikey:key:"+hX] != cliRedisDump(t, c)["apikey:key:"+hX] {
					t.Errorf("the old bravo record changed")
				}
				if n := c.Exists(ctx, "apikey:key:"+hB).Val(); n != 0 {
					t.Errorf("the refused bravo record was written")
				}
				for _, h := range []string{hA, hC} {
					cliRedisEntry(t, c, "apikey:", h)
				}
			},
		},
		{
			name:      "hash under another id: refused",
			pre:       []string{`{"id":"old","hash":"sha256:` + hA + `"}`},
			file:      cliRFile(cliRAlpha, cliRBravo),
			wantErr:   "1 of 2 keys refused",
			wantOut:   "imported 1, updated 0, refused 1\n",
			wantLog:   []string{`keys[0] (id "alpha"): refused: its hash is already in Redis, under another id`},
			published: []string{hB},
			check: func(t *testing.T, before map[string]string) {
				if n := c.Exists(ctx, "apikey:id:alpha").Val(); n != 0 {
					t.Errorf("the refused alpha left its id index")
				}
				if got := cliRedisDump(t, c)["apikey:key:"+hA]; got != before["apikey:key:"+hA] {
					t.Errorf("old's record changed to %s", got)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cliFlush(t, c)
			if len(tt.pre) > 0 {
				if out, stderr, err := cliRun(t, importCommand(), "", "--redis", srv.Addr, cliWriteKeys(t, cliRFile(tt.pre...))); err != nil {
					t.Fatalf("importing the setup: %v\n%s%s", err, out, stderr)
				}
			}
			before := cliRedisDump(t, c)
			ps := cliSubscribe(t, c, "apikey:events")
			path := cliWriteKeys(t, tt.file)
			stdout, stderr, err := cliRun(t, importCommand(), "", "--redis", srv.Addr, path)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("import: %v (stderr %q)", err, stderr)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("import: error %v, want one saying %q", err, tt.wantErr)
			}
			if stdout != tt.wantOut {
				t.Errorf("stdout = %q, want %q", stdout, tt.wantOut)
			}
			for _, s := range tt.wantLog {
				if !strings.Contains(stderr, s) {
					t.Errorf("stderr does not say %q:\n%s", s, stderr)
				}
			}
			cliExpectPublished(t, ps, tt.published...)
			if tt.check != nil {
				tt.check(t, before)
			} else if after := cliRedisDump(t, c); !maps.Equal(after, before) {
				t.Errorf("Redis changed:\n%v\nwant\n%v", after, before)
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "nope.json")
		if _, _, err := cliRun(t, importCommand(), "", "--redis", srv.Addr, missing); err == nil || !strings.Contains(err.Error(), missing) {
			t.Errorf("import of a missing file: error %v, want one naming it", err)
		}
	})
}

func TestCLIRedisStateCommands(t *testing.T) {
	srv := StartTestRedis(t)
	c := cliRedisClient(t, srv.Addr)
	ctx := context.Background()
	hB := cliHex("r-bravo")
	bravoOff := `{"id":"bravo","hash":"sha256:` + hB + `","disabled":true,"name":"B"}`
	bravoOn := `{"id":"bravo","hash":"sha256:` + hB + `","name":"B"}`
	tests := []struct {
		verb     string
		bravo    string
		disabled bool // bravo's state afterwards
		removed  bool
		state    string // bravo's STATE in list afterwards
	}{
		{verb: "disable", bravo: bravoOn, disabled: true, state: "disabled"},
		{verb: "disable", bravo: bravoOff, disabled: true, state: "disabled"},
		{verb: "enable", bravo: bravoOff, state: "active"},
		{verb: "enable", bravo: bravoOn, state: "active"},
		{verb: "remove", bravo: bravoOff, removed: true},
	}
	for _, tt := range tests {
		t.Run(tt.verb, func(t *testing.T) {
			cliFlush(t, c)
			if _, stderr, err := cliRun(t, importCommand(), "", "--redis", srv.Addr, cliWriteKeys(t, cliRFile(cliRAlpha, tt.bravo, cliRCharlie))); err != nil {
				t.Fatalf("import: %v (%s)", err, stderr)
			}
			before := cliRedisDump(t, c)
			ps := cliSubscribe(t, c, "apikey:events")
			stdout, stderr, err := cliRun(t, stateCommand(tt.verb), "", "--redis", srv.Addr, "--id", "bravo")
			if err != nil {
				t.Fatalf("%s: %v (stderr %q)", tt.verb, err, stderr)
			}
			done := map[string]string{"disable": "disabled", "enable": "enabled", "remove": "removed"}[tt.verb]
			if want := done + ` key "bravo" in redis ` + srv.Addr + "\n"; stderr != want || stdout != "" {
				t.Errorf("stdout %q, stderr %q; want nothing and %q", stdout, stderr, want)
			}
			cliExpectPublished(t, ps, hB)

			after := cliRedisDump(t, c)
			if tt.removed {
				for _, k := range []string{"apikey:key:" + hB, "apikey:id:bravo"} {
					if _, ok := after[k]; ok {
						t.Errorf("%s is still there after remove", k)
					}
				}
			} else {
				fields := c.HGetAll(ctx, "apikey:key:"+hB).Val()
				if d, ok := fields["disabled"]; tt.disabled && d != "true" || !tt.disabled && ok {
					t.Errorf("bravo after %s = %v, want disabled %v", tt.verb, fields, tt.disabled)
				}
				if fields["id"] != "bravo" || fields["name"] != "B" {
					t.Errorf("bravo's other fields changed: %v", fields)
				}
				if _, rec := cliRedisEntry(t, c, "apikey:", hB); rec.disabled != tt.disabled {
					t.Errorf("bravo's record: disabled %v, want %v", rec.disabled, tt.disabled)
				}
			}
			// Nothing else changed.
			for _, m := range []map[string]string{before, after} {
				delete(m, "apikey:key:"+hB)
				delete(m, "apikey:id:bravo")
			}
			if !maps.Equal(after, before) {
				t.Errorf("%s changed other keys:\n%v\nwant\n%v", tt.verb, after, before)
			}

			list, _, err := cliRun(t, listCommand(), "", "--redis", srv.Addr)
			if err != nil {
				t.Fatalf("list: %v", err)
			}
			var bravoRow []string
			for _, line := range strings.Split(list, "\n") {
				if f := strings.Fields(line); len(f) > 0 && f[0] == "bravo" {
					bravoRow = f
				}
			}
			switch {
			case tt.removed && bravoRow != nil:
				t.Errorf("list still shows bravo after remove:\n%s", list)
			case !tt.removed && (bravoRow == nil || bravoRow[len(bravoRow)-1] != tt.state):
				t.Errorf("list row of bravo = %q, want state %s:\n%s", bravoRow, tt.state, list)
			}
		})
	}
}

func TestCLIRedisStateCommandErrors(t *testing.T) {
	srv := StartTestRedis(t)
	c := cliRedisClient(t, srv.Addr)
	ctx := context.Background()
	tests := []struct {
		name    string
		id      string
		setup   func(t *testing.T)
		wantErr string
	}{
		{name: "unknown id", id: "zulu", wantErr: `no key with id "zulu"`},
		{
			name: "id index without its record",
			id:   "orphan",
			setup: func(t *testing.T) {
				c.Set(ctx, "apikey:id:orphan", cliHex("r-orphan"), 0)
			},
			wantErr: `"orphan"`,
		},
		{name: "bad id", id: `a"b`, wantErr: "--id"},
	}
	for _, verb := range []string{"disable", "enable", "remove"} {
		for _, tt := range tests {
			if verb == "remove" && tt.setup != nil {
				continue // removing what is left of a key is fine
			}
			t.Run(verb+" "+tt.name, func(t *testing.T) {
				cliFlush(t, c)
				if _, _, err := cliRun(t, importCommand(), "", "--redis", srv.Addr, cliWriteKeys(t, cliRFile(cliRAlpha, cliRBravo))); err != nil {
					t.Fatal(err)
				}
				if tt.setup != nil {
					tt.setup(t)
				}
				before := cliRedisDump(t, c)
				ps := cliSubscribe(t, c, "apikey:events")
				stdout, _, err := cliRun(t, stateCommand(verb), "", "--redis", srv.Addr, "--id", tt.id)
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("%s --id %s: error %v, want one saying %q", verb, tt.id, err, tt.wantErr)
				}
				if stdout != "" {
					t.Errorf("stdout = %q, want nothing", stdout)
				}
				if after := cliRedisDump(t, c); !maps.Equal(after, before) {
					t.Errorf("Redis changed:\n%v\nwant\n%v", after, before)
				}
				cliExpectPublished(t, ps)
			})
		}
	}
	t.Run("remove an id index without its record", func(t *testing.T) {
		cliFlush(t, c)
		c.Set(ctx, "apikey:id:orphan", cliHex("r-orphan"), 0)
		if _, _, err := cliRun(t, stateCommand("remove"), "", "--redis", srv.Addr, "--id", "orphan"); err != nil {
			t.Fatalf("remove: %v", err)
		}
		if n := c.DBSize(ctx).Val(); n != 0 {
			t.Errorf("Redis holds %d keys after remove, want 0", n)
		}
	})
}

func TestCLIRedisList(t *testing.T) {
	srv := StartTestRedis(t)
	c := cliRedisClient(t, srv.Addr)
	ctx := context.Background()
	// The entries of TestCLIList, in id order, so that the keys-file list
	// of the same entries is the Redis list's expected output.
	hashes := []string{cliHash("k-act"), cliHash("k-dis"), cliHash("k-exp"), cliHash("k-fut"), cliHash("k-nyv")}
	file := cliRFile(
		`{"id": "act", "hash": "`+hashes[0]+`", "name": "Active", "owner": "acme", "plan": "gold"}`,
		`{"id": "dis", "hash": "`+hashes[1]+`", "disabled": true, "name": "Off"}`,
		`{"id": "exp", "hash": "`+hashes[2]+`", "expires": "2001-02-03T04:05:06Z", "owner": "old"}`,
		`{"id": "fut", "hash": "`+hashes[3]+`", "expires": "2099-01-01T00:00:00Z"}`,
		`{"id": "nyv", "hash": "`+hashes[4]+`", "not_before": "2098-01-01T00:00:00Z", "expires": "2099-06-01T00:00:00Z", "plan": "silver"}`,
	)
	path := cliWriteKeys(t, file)

	t.Run("empty", func(t *testing.T) {
		stdout, _, err := cliRun(t, listCommand(), "", "--redis", srv.Addr)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Fields(stdout)[0] != "ID" || strings.Count(stdout, "\n") != 1 {
			t.Errorf("list of an empty Redis = %q, want the header only", stdout)
		}
	})

	// Imported in another order than listed.
	rev := cliRFile(
		`{"id": "nyv", "hash": "`+hashes[4]+`", "not_before": "2098-01-01T00:00:00Z", "expires": "2099-06-01T00:00:00Z", "plan": "silver"}`,
		`{"id": "act", "hash": "`+hashes[0]+`", "name": "Active", "owner": "acme", "plan": "gold"}`,
		`{"id": "fut", "hash": "`+hashes[3]+`", "expires": "2099-01-01T00:00:00Z"}`,
		`{"id": "dis", "hash": "`+hashes[1]+`", "disabled": true, "name": "Off"}`,
		`{"id": "exp", "hash": "`+hashes[2]+`", "expires": "2001-02-03T04:05:06Z", "owner": "old"}`,
	)
	if _, stderr, err := cliRun(t, importCommand(), "", "--redis", srv.Addr, cliWriteKeys(t, rev)); err != nil {
		t.Fatalf("import: %v (%s)", err, stderr)
	}
	// Records under other prefixes are not this deployment's.
	c.HSet(ctx, "other:key:"+cliHex("k-other"), "id", "other")
	c.HSet(ctx, "apikey:key:x"+cliHex("k-other"), "id", "longer")

	want, _, err := cliRun(t, listCommand(), "", "--keys-file", path)
	if err != nil {
		t.Fatalf("list --keys-file: %v", err)
	}
	stdout, stderr, err := cliRun(t, listCommand(), "", "--redis", srv.Addr)
	if err != nil {
		t.Fatalf("list --redis: %v (stderr %q)", err, stderr)
	}
	if stdout != want {
		t.Errorf("list --redis =\n%s\nwant (as list --keys-file)\n%s", stdout, want)
	}
	if strings.Count(stdout, "\n") != 6 {
		t.Errorf("list --redis printed %d lines, want 6:\n%s", strings.Count(stdout, "\n"), stdout)
	}
	for _, h := range hashes {
		hexPart := strings.TrimPrefix(h, "sha256:")
		if strings.Contains(stdout, hexPart[:16]) || strings.Contains(stdout, "sha256") {
			t.Errorf("list shows (part of) hash %s:\n%s", h, stdout)
		}
	}

	t.Run("a record that does not check out", func(t *testing.T) {
		c.HSet(ctx, "apikey:key:"+cliHex("k-bad"), "id", "bad", "burst", "many")
		c.Set(ctx, "apikey:key:"+cliHex("k-str"), "not a hash", 0)
		stdout, _, err := cliRun(t, listCommand(), "", "--redis", srv.Addr)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
		if len(lines) != 8 {
			t.Fatalf("list printed %d lines, want 8:\n%s", len(lines), stdout)
		}
		wantRows := map[string][]string{
			"(no": {"(no", "id)", "-", "-", "-", "-", "invalid"},
			"bad": {"bad", "-", "-", "-", "-", "invalid"},
		}
		for _, line := range lines {
			f := strings.Fields(line)
			if w, ok := wantRows[f[0]]; ok {
				if !slices.Equal(f, w) {
					t.Errorf("row %q, want %q", line, w)
				}
				delete(wantRows, f[0])
			}
		}
		if len(wantRows) != 0 {
			t.Errorf("rows missing: %v\n%s", wantRows, stdout)
		}
	})
}

func TestCLIRedisFlagErrors(t *testing.T) {
	srv := StartTestRedis(t)
	c := cliRedisClient(t, srv.Addr)
	tests := []struct {
		name    string
		cmd     func() *cobra.Command
		args    []string // the keys file is appended where "FILE" is
		wantErr []string
	}{
		{"generate with both", generateCommand, []string{"--keys-file", "FILE", "--redis", "ADDR"}, []string{"keys-file", "redis"}},
		{"list with both", listCommand, []string{"--keys-file", "FILE", "--redis", "ADDR"}, []string{"keys-file", "redis"}},
		{"disable with both", func() *cobra.Command { return stateCommand("disable") }, []string{"--keys-file", "FILE", "--redis", "ADDR", "--id", "alpha"}, []string{"keys-file", "redis"}},
		{"remove with neither", func() *cobra.Command { return stateCommand("remove") }, []string{"--id", "alpha"}, []string{"keys-file", "redis"}},
		{"list with neither", listCommand, nil, []string{"keys-file", "redis"}},
		{"import without redis", importCommand, []string{"FILE"}, []string{"redis"}},
		{"import without a file", importCommand, []string{"--redis", "ADDR"}, []string{"arg"}},
		{"import with keys-file", importCommand, []string{"--redis", "ADDR", "--keys-file", "FILE", "FILE"}, []string{"keys-file"}},
		{"empty address", listCommand, []string{"--redis", ""}, []string{"--redis"}},
		{"negative db", listCommand, []string{"--redis", "ADDR", "--redis-db", "-1"}, []string{"--redis-db"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cliFlush(t, c)
			path := cliWriteKeys(t, cliRFile(cliRAlpha))
			before := cliSnap(t, path)
			var args []string
			for _, a := range tt.args {
				args = append(args, strings.NewReplacer("FILE", path, "ADDR", srv.Addr).Replace(a))
			}
			stdout, _, err := cliRun(t, tt.cmd(), "", args...)
			if err == nil {
				t.Fatalf("%q succeeded", args)
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
			if regexp.MustCompile(`(?m)^key_`).MatchString(stdout) {
				t.Errorf("a key was printed: %q", stdout)
			}
			before.assertUnchanged(t, path)
			if n := c.DBSize(context.Background()).Val(); n != 0 {
				t.Errorf("Redis holds %d keys, want none", n)
			}
		})
	}
}

func TestCLIRedisUnreachable(t *testing.T) {
	// A closed port refuses at once; a silent listener accepts and never
	// answers, which only the timeout ends.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	commands := map[string]func(addr string) (*cobra.Command, []string){
		"generate": func(addr string) (*cobra.Command, []string) { return generateCommand(), []string{"--redis", addr} },
		"list":     func(addr string) (*cobra.Command, []string) { return listCommand(), []string{"--redis", addr} },
		"disable": func(addr string) (*cobra.Command, []string) {
			return stateCommand("disable"), []string{"--redis", addr, "--id", "alpha"}
		},
		"import": func(addr string) (*cobra.Command, []string) {
			return importCommand(), []string{"--redis", addr, cliWriteKeys(t, cliRFile(cliRAlpha))}
		},
	}
	for _, where := range []struct{ name, addr string }{{"closed port", closed}, {"silent listener", silent.Addr().String()}} {
		for name, mk := range commands {
			cmd, args := mk(where.addr)
			t.Run(where.name+" "+name, func(t *testing.T) {
				t.Parallel()
				start := time.Now()
				stdout, _, err := cliRun(t, cmd, "", args...)
				elapsed := time.Since(start)
				if err == nil {
					t.Fatal("succeeded without Redis")
				}
				if want := "redis " + where.addr + ": connecting: "; !strings.Contains(err.Error(), want) {
					t.Errorf("error %q, want one saying %q", err, want)
				}
				if elapsed > 8*time.Second {
					t.Errorf("took %v to fail, want a few seconds at most", elapsed)
				}
				if stdout != "" {
					t.Errorf("stdout = %q, want nothing", stdout)
				}
			})
		}
	}
}

func TestCLIRedisPassword(t *testing.T) {
	srv := StartTestRedis(t)
	const password = "s3cret-Pw-42"
	admin := cliRedisClient(t, srv.Addr)
	if err := admin.ConfigSet(context.Background(), "requirepass", password).Err(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		env     string
		args    []string
		wantErr string // "" for success
	}{
		{name: "from REDIS_PASSWORD", env: password},
		{name: "from the flag", args: []string{"--redis-password", password}},
		{name: "flag placeholder", env: "", args: []string{"--redis-password", "{env.APIKEY_TEST_PW}"}},
		{name: "wrong", env: password + "-not", wantErr: "WRONGPASS"},
		{name: "wrong flag beats the environment", env: password, args: []string{"--redis-password", "wrong-" + password}, wantErr: "WRONGPASS"},
		{name: "none", wantErr: "NOAUTH"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("REDIS_PASSWORD", tt.env)
			t.Setenv("APIKEY_TEST_PW", password)
			args := append([]string{"--redis", srv.Addr}, tt.args...)
			stdout, stderr, err := cliRun(t, listCommand(), "", args...)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("list: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("list: error %v, want one saying %s", err, tt.wantErr)
			}
			if strings.Contains(stdout+stderr, password) || err != nil && strings.Contains(err.Error(), password) {
				t.Errorf("the password was shown: stdout %q, stderr %q, error %v", stdout, stderr, err)
			}
		})
	}
	t.Run("help names the variable, not its value", func(t *testing.T) {
		t.Setenv("REDIS_PASSWORD", password)
		stdout, _, err := cliRun(t, listCommand(), "", "--help")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(stdout, "REDIS_PASSWORD") || strings.Contains(stdout, password) {
			t.Errorf("help:\n%s", stdout)
		}
	})
}

// TestCLIRedisHandlerSeesChanges runs a handler that looks keys up in
// Redis: a key the CLI generates works at once, and the handler hears of
// disable, enable and remove through the published change, well before its
// cache (five minutes) would let it notice.
func TestCLIRedisHandlerSeesChanges(t *testing.T) {
	srv := StartTestRedis(t)
	h := newTestHandler(t, &Handler{Store: "redis", Redis: &RedisConfig{Addresses: []string{srv.Addr}},
		QuotaFile: filepath.Join(t.TempDir(), "quotas.db")})
	// Cleanups run last first: Redis stops before the handler's Cleanup,
	// whose backend would otherwise wait for its idle subscription's read
	// to end (redisBackend.Destruct cancels a context that go-redis's
	// PubSub.Receive does not watch).
	t.Cleanup(srv.Stop)
	deadline := time.Now().Add(2 * time.Second)
	for !h.redis.subscribed.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the handler did not subscribe to the change channel within 2s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stdout, stderr, err := cliRun(t, generateCommand(), "", "--redis", srv.Addr, "--id", "e2e")
	if err != nil {
		t.Fatalf("generate: %v (%s)", err, stderr)
	}
	key, _, _ := cliGenerated(t, stdout)

	serve := func() (int, string) {
		var next nextRecorder
		p := prepare("/", http.Header{"Authorization": {"Bearer " + key}})
		status := 200
		if err := h.ServeHTTP(p.w, p.r, &next); err != nil {
			var he caddyhttp.HandlerError
			if !errors.As(err, &he) {
				t.Fatalf("ServeHTTP: %v", err)
			}
			status = he.StatusCode
		}
		outcome, _ := p.repl.GetString("http.api_key.outcome")
		return status, outcome
	}
	for i := range 2 { // the second from the cache
		if status, outcome := serve(); status != 200 || outcome != "ok" {
			t.Fatalf("request %d with the generated key: %d %s, want 200 ok", i+1, status, outcome)
		}
	}
	steps := []struct {
		verb    string
		status  int
		outcome string
	}{
		{"disable", 401, "disabled"},
		{"enable", 200, "ok"},
		{"remove", 401, "invalid"},
	}
	for _, st := range steps {
		if _, stderr, err := cliRun(t, stateCommand(st.verb), "", "--redis", srv.Addr, "--id", "e2e"); err != nil {
			t.Fatalf("%s: %v (%s)", st.verb, err, stderr)
		}
		start := time.Now()
		var status int
		var outcome string
		for {
			if status, outcome = serve(); status == st.status && outcome == st.outcome {
				break
			}
			if time.Since(start) > 2*time.Second {
				t.Fatalf("after %s: still %d %s after 2s, want %d %s", st.verb, status, outcome, st.status, st.outcome)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("after %s: the handler answered %d %s only after %v, want within 1s", st.verb, st.status, st.outcome, took)
		}
	}
}
