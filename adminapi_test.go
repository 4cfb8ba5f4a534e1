package apikey_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// adminDo calls the admin API and returns the status and the body of its
// answer.
func adminDo(t *testing.T, method, url string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the answer: %v", method, url, err)
	}
	return resp.StatusCode, body
}

// adminCall calls the admin API and decodes its JSON answer.
func adminCall(t *testing.T, method, url string, out any) int {
	t.Helper()
	status, body := adminDo(t, method, url)
	if bytes.Contains(body, []byte("sha256")) {
		t.Errorf("%s %s: the answer holds a hash: %s", method, url, body)
	}
	if out != nil && (status < 300 || status == http.StatusUnprocessableEntity) {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("%s %s: %v\n%s", method, url, err, body)
		}
	}
	return status
}

// adminCallError calls the admin API and returns the status and the
// message of its error answer ("" for none).
func adminCallError(t *testing.T, method, url string) (int, string) {
	t.Helper()
	status, body := adminDo(t, method, url)
	var ans struct {
		Error string `json:"error"`
	}
	if status >= 400 {
		if err := json.Unmarshal(body, &ans); err != nil {
			t.Fatalf("%s %s: %d, and the answer is no error: %v\n%s", method, url, status, err, body)
		}
	}
	return status, ans.Error
}

type adminKeysAnswer []struct {
	Handler string `json:"handler"`
	Keys    []struct {
		ID, Name, Owner, Plan, Expires, State, Source string
	} `json:"keys"`
}

type adminUsageAnswer []struct {
	Handler string `json:"handler"`
	Keys    []struct {
		ID       string           `json:"id"`
		Requests map[string]int64 `json:"requests"`
		LastSeen string           `json:"last_seen"`
		Quota    *struct {
			Limit     string `json:"limit"`
			Used      int64  `json:"used"`
			Remaining int64  `json:"remaining"`
			Counters  string `json:"counters"`
		} `json:"quota"`
	} `json:"keys"`
}

type adminReloadAnswer []struct {
	Handler string `json:"handler"`
	File    string `json:"file"`
	Keys    int    `json:"keys"`
	Added   int    `json:"added"`
	Removed int    `json:"removed"`
	Changed bool   `json:"changed"`
	Error   string `json:"error"`
}

// TestAdminAPI runs a config with two api_key sites and the admin
// endpoint, and asks it about keys, usage, reloads and the cache.
func TestAdminAPI(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys.json")
	e2eWriteFile(t, keys, []byte(`{"keys": [
		{"id": "acme", "hash": "`+e2eHash(e2eKey1)+`", "name": "Acme", "owner": "acme", "plan": "pro"},
		{"id": "gone", "hash": "`+e2eHash(e2eKey3)+`", "expires": "2020-01-01T00:00:00Z"}
	]}`))
	adminPort, portA, portB := e2eFreePort(t), e2eFreePort(t), e2eFreePort(t)
	caddyfile := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	storage file_system %s
}

:%d {
	api_key {
		name site-a
		keys_file %s
		quota_file %s
		plan pro {
			quota 100/day
		}
	}
	respond ok
}

:%d {
	api_key {
		name site-b
		key ci %s
	}
	respond ok
}
`, adminPort, filepath.Join(dir, "storage"), portA, keys, filepath.Join(dir, "q.db"), portB, e2eKey2)
	cfg := e2eAdapt(t, []byte(caddyfile))
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	admin := fmt.Sprintf("http://127.0.0.1:%d/api_key", adminPort)
	client := e2eClient(t)
	siteA, siteB := fmt.Sprintf("http://127.0.0.1:%d/", portA), fmt.Sprintf("http://127.0.0.1:%d/", portB)

	t.Run("keys", func(t *testing.T) {
		var ans adminKeysAnswer
		if code := adminCall(t, "GET", admin+"/keys", &ans); code != 200 {
			t.Fatalf("status %d", code)
		}
		if len(ans) != 2 || ans[0].Handler != "site-a" || ans[1].Handler != "site-b" {
			t.Fatalf("handlers = %+v, want site-a and site-b", ans)
		}
		a := ans[0].Keys
		if len(a) != 2 || a[0].ID != "acme" || a[0].Plan != "pro" || a[0].State != "active" || a[0].Source != "keys_file" ||
			a[1].ID != "gone" || a[1].State != "expired" || a[1].Expires == "" {
			t.Errorf("site-a keys = %+v", a)
		}
		if b := ans[1].Keys; len(b) != 1 || b[0].ID != "ci" || b[0].Source != "config" {
			t.Errorf("site-b keys = %+v", b)
		}
		if code := adminCall(t, "POST", admin+"/keys", nil); code != http.StatusMethodNotAllowed {
			t.Errorf("POST /keys: %d, want 405", code)
		}
	})

	t.Run("usage", func(t *testing.T) {
		for _, k := range []string{e2eKey1, e2eKey1, e2eKey3} {
			e2eGet(t, client, siteA, bearer(k))
		}
		e2eGet(t, client, siteB, bearer(e2eKey2))
		var ans adminUsageAnswer
		if code := adminCall(t, "GET", admin+"/usage?id=acme", &ans); code != 200 {
			t.Fatalf("status %d", code)
		}
		if len(ans) != 2 || len(ans[0].Keys) != 1 || len(ans[1].Keys) != 0 {
			t.Fatalf("usage?id=acme = %+v, want acme under site-a only", ans)
		}
		acme := ans[0].Keys[0]
		if acme.Requests["ok"] < 2 || acme.LastSeen == "" || acme.Quota == nil || acme.Quota.Limit != "100/day" ||
			acme.Quota.Used < 2 || acme.Quota.Used+acme.Quota.Remaining != 100 || acme.Quota.Counters != "local" {
			t.Errorf("acme usage = %+v (quota %+v)", acme, acme.Quota)
		}
		if seen, err := time.Parse(time.RFC3339, acme.LastSeen); err != nil || time.Since(seen) > time.Minute || time.Until(seen) > time.Second {
			t.Errorf("acme last_seen = %q (%v), want about now", acme.LastSeen, err)
		}
		ans = nil
		adminCall(t, "GET", admin+"/usage?id=gone", &ans)
		if g := ans[0].Keys; len(g) != 1 || g[0].Requests["expired"] < 1 {
			t.Errorf("gone usage = %+v, want expired counted", g)
		}
		if code := adminCall(t, "GET", admin+"/usage?id=nobody", nil); code != http.StatusNotFound {
			t.Errorf("usage of an unknown id: %d, want 404", code)
		}
	})

	// A query that does not parse, or asks for what an endpoint does not
	// take, is refused rather than answered as if it had not been asked;
	// the refusal never quotes the query, in case it holds a key.
	t.Run("queries", func(t *testing.T) {
		tests := []struct {
			method, path string
			wantStatus   int
			wantErr      string
		}{
			{"GET", "/usage?id=%zz", 400, `query does not parse: a "%" must start an escape`},
			{"GET", "/usage?%zz=acme", 400, `query does not parse: a "%" must start an escape`},
			{"GET", "/usage?id=acme%", 400, `query does not parse: a "%" must start an escape`},
			{"GET", "/usage?id=acme;x=1", 400, "query does not parse: invalid semicolon separator"},
			{"GET", "/usage?ids=acme", 400, "unknown query parameter: /api_key/usage takes only id"},
			{"GET", "/usage?" + e2eKey1, 400, "unknown query parameter: /api_key/usage takes only id"},
			{"GET", "/usage?id=acme&key=" + e2eKey1, 400, "unknown query parameter: /api_key/usage takes only id"},
			{"GET", "/usage?id=acme&id=ci", 400, "query parameter id given 2 times"},
			{"GET", "/usage?id=", 400, "query parameter id is empty"},
			{"GET", "/usage?id", 400, "query parameter id is empty"},
			{"GET", "/keys?id=acme", 400, "/api_key/keys takes no query parameters"},
			{"GET", "/keys?%zz", 400, `query does not parse: a "%" must start an escape`},
			{"POST", "/reload?now=1", 400, "/api_key/reload takes no query parameters"},
			{"POST", "/cache/purge?id=acme", 400, "/api_key/cache/purge takes no query parameters"},
			{"POST", "/usage?id=%zz", 405, "method POST not allowed"},
			{"GET", "/usage?id=acme", 200, ""},
			{"GET", "/usage?id=acme%2D", 404, `no key with id "acme-"`},
			{"GET", "/usage?id=ac%6De", 200, ""},
			{"GET", "/usage", 200, ""},
			{"GET", "/usage?", 200, ""},
			{"GET", "/keys", 200, ""},
		}
		for _, tt := range tests {
			t.Run(tt.method+" "+strings.ReplaceAll(tt.path, e2eKey1, "KEY"), func(t *testing.T) {
				code, msg := adminCallError(t, tt.method, admin+tt.path)
				if code != tt.wantStatus || !strings.Contains(msg, tt.wantErr) || (tt.wantErr == "") != (msg == "") {
					t.Errorf("%d %q, want %d %q", code, msg, tt.wantStatus, tt.wantErr)
				}
				if strings.Contains(msg, e2eKey1) || strings.Contains(msg, "zz") {
					t.Errorf("the error quotes the query: %q", msg)
				}
			})
		}
	})

	t.Run("reload", func(t *testing.T) {
		e2eWriteFile(t, keys, []byte(`{"keys": [
			{"id": "acme", "hash": "`+e2eHash(e2eKey1)+`", "plan": "pro"},
			{"id": "new", "hash": "`+e2eHash(e2eKey4)+`"}
		]}`))
		var ans adminReloadAnswer
		if code := adminCall(t, "POST", admin+"/reload", &ans); code != 200 {
			t.Fatalf("status %d: %+v", code, ans)
		}
		if a := ans[0]; a.Handler != "site-a" || a.File != keys || !a.Changed || a.Keys != 2 || a.Added != 1 || a.Removed != 1 || a.Error != "" {
			t.Errorf("reload answer = %+v", a)
		}
		if resp := e2eGet(t, client, siteA, bearer(e2eKey4)); resp.status != 200 {
			t.Errorf("the added key: %d, want 200", resp.status)
		}
		e2eWriteFile(t, keys, []byte(`{"keys": [`))
		ans = nil
		if code := adminCall(t, "POST", admin+"/reload", &ans); code != http.StatusUnprocessableEntity {
			t.Fatalf("reload of a broken file: %d, want 422", code)
		}
		if a := ans[0]; a.Changed || !strings.Contains(a.Error, keys) || a.Keys != 2 {
			t.Errorf("reload answer for a broken file = %+v", a)
		}
		if resp := e2eGet(t, client, siteA, bearer(e2eKey4)); resp.status != 200 {
			t.Errorf("after a broken reload the previous keys must serve: %d", resp.status)
		}
	})

	t.Run("cache purge", func(t *testing.T) {
		var ans []struct {
			Handler string `json:"handler"`
			Purged  bool   `json:"purged"`
		}
		if code := adminCall(t, "POST", admin+"/cache/purge", &ans); code != 200 || len(ans) != 2 || !ans[0].Purged || !ans[1].Purged {
			t.Fatalf("purge: %d %+v", code, ans)
		}
		if resp := e2eGet(t, client, siteB, bearer(e2eKey2)); resp.status != 200 {
			t.Errorf("after a purge: %d, want 200", resp.status)
		}
	})
}
