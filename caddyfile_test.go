package apikey

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// sha256Hex returns the "sha256:<hex>" form of s, computed independently of
// hashKey.
func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// digestA is a well-formed digest used where any digest will do.
const digestA = "sha256:580843d03d2216ff1a275d0991bad66e4d1af871171d929e9de604b7959f9bca"

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  Handler
		// secrets must appear nowhere in the parsed handler.
		secrets []string
	}{
		{
			name: "defaults with only keys_file",
			input: `api_key {
				keys_file /etc/caddy/keys.json
			}`,
			want: Handler{KeysFile: "/etc/caddy/keys.json"},
		},
		{
			name: "keys_file placeholder is kept",
			input: `api_key {
				keys_file {env.KEYS_FILE}
			}`,
			want: Handler{KeysFile: "{env.KEYS_FILE}"},
		},
		{
			name: "every from form in order",
			input: `api_key {
				from bearer
				from header X-Api-Key
				from query api_key
				from cookie k
				keys_file keys.json
			}`,
			want: Handler{
				From: []KeySource{
					{Source: "bearer"},
					{Source: "header", Name: "X-Api-Key"},
					{Source: "query", Name: "api_key"},
					{Source: "cookie", Name: "k"},
				},
				KeysFile: "keys.json",
			},
		},
		{
			name: "header name is kept as written",
			input: `api_key {
				from header x-api-key
				keys_file keys.json
			}`,
			want: Handler{From: []KeySource{{Source: "header", Name: "x-api-key"}}, KeysFile: "keys.json"},
		},
		{
			name: "query and cookie names are case-sensitive",
			input: `api_key {
				from query key
				from query KEY
				from cookie k
				from cookie K
				keys_file keys.json
			}`,
			want: Handler{
				From: []KeySource{
					{Source: "query", Name: "key"},
					{Source: "query", Name: "KEY"},
					{Source: "cookie", Name: "k"},
					{Source: "cookie", Name: "K"},
				},
				KeysFile: "keys.json",
			},
		},
		{
			name: "several keys: plaintext hashed, placeholder kept, digest kept",
			input: `api_key {
				key ci s3cret
				key deploy {env.CI_KEY}
				key x ` + digestA + `
			}`,
			want: Handler{Keys: []InlineKey{
				{ID: "ci", Key: "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"},
				{ID: "deploy", Key: "{env.CI_KEY}"},
				{ID: "x", Key: digestA},
			}},
			secrets: []string{"s3cret"},
		},
		{
			name: "plaintext key with punctuation is hashed",
			input: `api_key {
				key ci "k3y-with.punct~!}"
			}`,
			want:    Handler{Keys: []InlineKey{{ID: "ci", Key: sha256Hex("k3y-with.punct~!}")}}},
			secrets: []string{"k3y-with.punct~!}"},
		},
		{
			// A "{" with no "}" after it cannot start a placeholder, so
			// this is a literal key and must not reach the JSON config.
			name: "plaintext key with an unclosed brace is hashed",
			input: `api_key {
				key ci s3cr{t
			}`,
			want:    Handler{Keys: []InlineKey{{ID: "ci", Key: sha256Hex("s3cr{t")}}},
			secrets: []string{"s3cr{t"},
		},
		{
			name: "plaintext key of the maximum length is hashed",
			input: `api_key {
				key long ` + strings.Repeat("k", maxKeyLen) + `
			}`,
			want:    Handler{Keys: []InlineKey{{ID: "long", Key: sha256Hex(strings.Repeat("k", maxKeyLen))}}},
			secrets: []string{strings.Repeat("k", maxKeyLen)},
		},
		{
			name: "rate with burst",
			input: `api_key {
				keys_file keys.json
				rate 600/1m burst 50
			}`,
			want: Handler{KeysFile: "keys.json", Rate: "600/1m", Burst: 50},
		},
		{
			name: "rate without burst",
			input: `api_key {
				keys_file keys.json
				rate 10/s
			}`,
			want: Handler{KeysFile: "keys.json", Rate: "10/s"},
		},
		{
			name: "cache block",
			input: `api_key {
				keys_file keys.json
				cache {
					size 10
					ttl 1m
					negative_ttl 5s
				}
			}`,
			want: Handler{KeysFile: "keys.json", Cache: &CacheConfig{
				Size:        10,
				TTL:         caddy.Duration(time.Minute),
				NegativeTTL: caddy.Duration(5 * time.Second),
			}},
		},
		{
			name: "refusals errors",
			input: `api_key {
				keys_file keys.json
				refusals errors
			}`,
			want: Handler{KeysFile: "keys.json", Refusals: "errors"},
		},
		{
			name: "cache block with one setting",
			input: `api_key {
				keys_file keys.json
				cache {
					ttl 1d
				}
			}`,
			want: Handler{KeysFile: "keys.json", Cache: &CacheConfig{TTL: caddy.Duration(24 * time.Hour)}},
		},
		{
			name: "realm",
			input: `api_key {
				keys_file keys.json
				realm "my api"
			}`,
			want: Handler{KeysFile: "keys.json", Realm: "my api"},
		},
		{
			name: "pass_key",
			input: `api_key {
				keys_file keys.json
				pass_key
			}`,
			want: Handler{KeysFile: "keys.json", PassKey: true},
		},
		{
			name: "everything",
			input: `api_key {
				from header X-Api-Key
				from bearer
				keys_file /k.json
				key ci s3cret
				rate 5/1h burst 2
				cache {
					size 7
				}
				realm r
				pass_key
			}`,
			want: Handler{
				From:     []KeySource{{Source: "header", Name: "X-Api-Key"}, {Source: "bearer"}},
				KeysFile: "/k.json",
				Keys:     []InlineKey{{ID: "ci", Key: sha256Hex("s3cret")}},
				Rate:     "5/1h",
				Burst:    2,
				Cache:    &CacheConfig{Size: 7},
				Realm:    "r",
				PassKey:  true,
			},
			secrets: []string{"s3cret"},
		},
		{
			name: "quota, plans, prefixes and quota_file",
			input: `api_key {
				keys_file /k.json
				quota 10000/month
				prefix sk_live
				prefix pk
				quota_file /var/lib/caddy/q.db
				plan free {
					rate 10/1m burst 2
					quota 100/day
				}
				plan gold {
					rate off
					quota off
					allow_ips 10.0.0.0/8 192.0.2.1
					allow_referrers https://*.example.com/*
					allow_methods GET HEAD
					allow_paths /v1 /files/*.png
				}
				plan bare
			}`,
			want: Handler{
				KeysFile:  "/k.json",
				Quota:     "10000/month",
				Prefixes:  []string{"sk_live", "pk"},
				QuotaFile: "/var/lib/caddy/q.db",
				Plans: map[string]*Plan{
					"free": {Rate: "10/1m", Burst: 2, Quota: "100/day"},
					"gold": {Rate: "off", Quota: "off", Restrictions: Restrictions{
						AllowIPs:       []string{"10.0.0.0/8", "192.0.2.1"},
						AllowReferrers: []string{"https://*.example.com/*"},
						AllowMethods:   []string{"GET", "HEAD"},
						AllowPaths:     []string{"/v1", "/files/*.png"},
					}},
					"bare": {},
				},
			},
		},
		{
			name: "redis",
			input: `api_key {
				redis {
					address 10.0.0.1:6379 10.0.0.2:6379
					master_name mymaster
					username caddy
					password {env.REDIS_PASSWORD}
					db 2
					tls
					key_prefix site1:
					timeout 80ms
				}
				store redis
				limits redis
				on_store_error allow_cached
				on_limiter_error deny
			}`,
			want: Handler{
				Redis: &RedisConfig{Addresses: []string{"10.0.0.1:6379", "10.0.0.2:6379"}, MasterName: "mymaster",
					Username: "caddy", Password: "{env.REDIS_PASSWORD}", DB: 2, TLS: true, KeyPrefix: "site1:",
					Timeout: caddy.Duration(80 * time.Millisecond)},
				Store: "redis", Limits: "redis", OnStoreError: "allow_cached", OnLimiterError: "deny",
			},
		},
		{
			name: "redis limits with a keys file",
			input: `api_key {
				keys_file k.json
				redis
				limits redis
			}`,
			want: Handler{KeysFile: "k.json", Redis: &RedisConfig{}, Limits: "redis"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got Handler
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input)); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			assertHandlerConfig(t, got, tt.want)
			for _, s := range tt.secrets {
				assertNoSecret(t, got, s)
			}
		})
	}
}

// assertHandlerConfig compares the configuration fields of two handlers.
func assertHandlerConfig(t *testing.T, got, want Handler) {
	t.Helper()
	if !reflect.DeepEqual(got.From, want.From) {
		t.Errorf("From = %#v, want %#v", got.From, want.From)
	}
	if got.KeysFile != want.KeysFile {
		t.Errorf("KeysFile = %q, want %q", got.KeysFile, want.KeysFile)
	}
	if !reflect.DeepEqual(got.Keys, want.Keys) {
		t.Errorf("Keys = %#v, want %#v", got.Keys, want.Keys)
	}
	if got.Rate != want.Rate {
		t.Errorf("Rate = %q, want %q", got.Rate, want.Rate)
	}
	if got.Burst != want.Burst {
		t.Errorf("Burst = %d, want %d", got.Burst, want.Burst)
	}
	if !reflect.DeepEqual(got.Cache, want.Cache) {
		t.Errorf("Cache = %#v, want %#v", got.Cache, want.Cache)
	}
	if got.Realm != want.Realm {
		t.Errorf("Realm = %q, want %q", got.Realm, want.Realm)
	}
	if got.PassKey != want.PassKey {
		t.Errorf("PassKey = %v, want %v", got.PassKey, want.PassKey)
	}
	if got.Quota != want.Quota || got.QuotaFile != want.QuotaFile {
		t.Errorf("Quota, QuotaFile = %q, %q, want %q, %q", got.Quota, got.QuotaFile, want.Quota, want.QuotaFile)
	}
	if !reflect.DeepEqual(got.Prefixes, want.Prefixes) {
		t.Errorf("Prefixes = %q, want %q", got.Prefixes, want.Prefixes)
	}
	if !reflect.DeepEqual(got.Redis, want.Redis) {
		t.Errorf("Redis = %+v, want %+v", got.Redis, want.Redis)
	}
	if got.Store != want.Store || got.Limits != want.Limits || got.OnStoreError != want.OnStoreError || got.OnLimiterError != want.OnLimiterError {
		t.Errorf("Store, Limits, OnStoreError, OnLimiterError = %q %q %q %q, want %q %q %q %q",
			got.Store, got.Limits, got.OnStoreError, got.OnLimiterError, want.Store, want.Limits, want.OnStoreError, want.OnLimiterError)
	}
	if !reflect.DeepEqual(got.Plans, want.Plans) {
		t.Errorf("Plans = %s, want %s", mustMarshal(t, got.Plans), mustMarshal(t, want.Plans))
	}
	// Parsing sets only the JSON fields: the runtime state waits for
	// Provision.
	if got.sources != nil || got.inline != nil || got.keysFile != nil || got.cache != nil || got.limiter != nil || got.logger != nil {
		t.Errorf("UnmarshalCaddyfile set runtime state: %+v", got)
	}
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// assertNoSecret fails if secret appears anywhere in the handler, as Go
// syntax or as the JSON config it becomes.
func assertNoSecret(t *testing.T, h Handler, secret string) {
	t.Helper()
	if s := fmt.Sprintf("%#v", h); strings.Contains(s, secret) {
		t.Errorf("the plaintext key appears in the handler: %s", s)
	}
	js, err := json.Marshal(h)
	if err != nil {
		t.Fatalf("marshaling handler: %v", err)
	}
	if strings.Contains(string(js), secret) {
		t.Errorf("the plaintext key appears in the JSON config: %s", js)
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  string // the message, without the location
		line  int
		// secret must not appear in the error.
		secret string
	}{
		{
			name:  "argument after api_key",
			input: "api_key foo {\n\tkeys_file k.json\n}",
			want:  "wrong argument count or unexpected line ending after 'foo'",
			line:  1,
		},
		{
			name:  "unknown subdirective",
			input: "api_key {\n\tkeys_file k.json\n\tkeyz a b\n}",
			want:  `unknown subdirective "keyz"`,
			line:  3,
		},
		{
			name:  "from without source",
			input: "api_key {\n\tkeys_file k.json\n\tfrom\n}",
			want:  "wrong argument count or unexpected line ending after 'from'",
			line:  3,
		},
		{
			name:  "from unknown source",
			input: "api_key {\n\tfrom basic\n\tkeys_file k.json\n}",
			want:  `from: unknown source "basic" (want bearer, header, query or cookie)`,
			line:  2,
		},
		{
			name:  "from source is case-sensitive",
			input: "api_key {\n\tfrom Bearer\n\tkeys_file k.json\n}",
			want:  `from: unknown source "Bearer"`,
			line:  2,
		},
		{
			name:  "from header without name",
			input: "api_key {\n\tfrom header\n\tkeys_file k.json\n}",
			want:  "from header: missing name",
			line:  2,
		},
		{
			name:  "from query without name",
			input: "api_key {\n\tfrom query\n\tkeys_file k.json\n}",
			want:  "from query: missing name",
			line:  2,
		},
		{
			name:  "from cookie without name",
			input: "api_key {\n\tfrom cookie\n\tkeys_file k.json\n}",
			want:  "from cookie: missing name",
			line:  2,
		},
		{
			name:  "from bearer with a name",
			input: "api_key {\n\tfrom bearer X-Token\n\tkeys_file k.json\n}",
			want:  `from bearer: unexpected argument "X-Token"`,
			line:  2,
		},
		{
			name:  "from header with surplus argument",
			input: "api_key {\n\tfrom header X-Api-Key X-Other\n\tkeys_file k.json\n}",
			want:  `from header: unexpected argument "X-Other"`,
			line:  2,
		},
		{
			name:  "from query with surplus argument",
			input: "api_key {\n\tkeys_file k.json\n\tfrom query a b\n}",
			want:  `from query: unexpected argument "b"`,
			line:  3,
		},
		{
			name:  "from cookie with surplus argument",
			input: "api_key {\n\tkeys_file k.json\n\tfrom cookie a b\n}",
			want:  `from cookie: unexpected argument "b"`,
			line:  3,
		},
		{
			name:  "from header with an invalid name",
			input: "api_key {\n\tkeys_file k.json\n\tfrom header X:Key\n}",
			want:  `from header: invalid header name "X:Key"`,
			line:  3,
		},
		{
			name:  "from header Cookie",
			input: "api_key {\n\tkeys_file k.json\n\tfrom header cookie\n}",
			want:  "from header: use from cookie <name> for a cookie",
			line:  3,
		},
		{
			name:  "from cookie with an invalid name",
			input: "api_key {\n\tkeys_file k.json\n\tfrom cookie a=b\n}",
			want:  `from cookie: invalid cookie name "a=b"`,
			line:  3,
		},
		{
			name:  "duplicate from bearer",
			input: "api_key {\n\tfrom bearer\n\tkeys_file k.json\n\tfrom bearer\n}",
			want:  "duplicate from bearer",
			line:  4,
		},
		{
			name:  "duplicate from header differing in case",
			input: "api_key {\n\tfrom header X-Api-Key\n\tfrom header x-api-key\n\tkeys_file k.json\n}",
			want:  "duplicate from header x-api-key",
			line:  3,
		},
		{
			name:  "duplicate from query",
			input: "api_key {\n\tfrom query k\n\tfrom query k\n\tkeys_file k.json\n}",
			want:  "duplicate from query k",
			line:  3,
		},
		{
			name:  "duplicate from cookie",
			input: "api_key {\n\tfrom cookie k\n\tfrom cookie k\n\tkeys_file k.json\n}",
			want:  "duplicate from cookie k",
			line:  3,
		},
		{
			name:  "keys_file without path",
			input: "api_key {\n\tkeys_file\n}",
			want:  "wrong argument count or unexpected line ending after 'keys_file'",
			line:  2,
		},
		{
			name:  "keys_file with surplus argument",
			input: "api_key {\n\tkeys_file a.json b.json\n}",
			want:  `keys_file: unexpected argument "b.json"`,
			line:  2,
		},
		{
			name:  "duplicate keys_file",
			input: "api_key {\n\tkeys_file a.json\n\tkeys_file b.json\n}",
			want:  "duplicate keys_file",
			line:  3,
		},
		{
			name:  "key without id",
			input: "api_key {\n\tkeys_file k.json\n\tkey\n}",
			want:  "key: missing id and key",
			line:  3,
		},
		{
			name:  "key without value",
			input: "api_key {\n\tkeys_file k.json\n\tkey ci\n}",
			want:  "key: want <id> <key or sha256:hash>, got one argument (an unset {$VAR} leaves the key out)",
			line:  3,
		},
		{
			name:  "key with an empty value",
			input: "api_key {\n\tkeys_file k.json\n\tkey ci \"\"\n}",
			want:  "key: the key is empty (is its {$VAR} set?)",
			line:  3,
		},
		{
			name:   "key with surplus argument",
			input:  "api_key {\n\tkey ci s3cret s3cond\n}",
			want:   "key: too many arguments; want <id> <key or sha256:hash>",
			line:   2,
			secret: "s3c",
		},
		{
			name:  "key id with a quote",
			input: "api_key {\n\tkeys_file k.json\n\tkey \"a\\\"b\" s3cret\n}",
			want:  `key: invalid id: use 1 to 128 visible ASCII characters other than quotes and backslash`,
			line:  3,
		},
		{
			name:  "key id with a space",
			input: "api_key {\n\tkeys_file k.json\n\tkey \"a b\" s3cret\n}",
			want:  `key: invalid id: use 1 to 128 visible ASCII characters other than quotes and backslash`,
			line:  3,
		},
		{
			name:  "key id too long",
			input: "api_key {\n\tkey " + strings.Repeat("i", 129) + " s3cret\n}",
			want:  `key: invalid id: use 1 to 128 visible ASCII characters other than quotes and backslash`,
			line:  2,
		},
		{
			name:  "duplicate key id",
			input: "api_key {\n\tkey ci s3cret\n\tkey ci other\n}",
			want:  `duplicate key id "ci"`,
			line:  3,
		},
		{
			name:  "sha256 too short",
			input: "api_key {\n\tkey x sha256:abcd\n}",
			want:  `key x: "hash" must be "sha256:" and 64 hex digits, not 4 characters`,
			line:  2,
		},
		{
			name:  "sha256 too long",
			input: "api_key {\n\tkey x " + digestA + "0\n}",
			want:  `key x: "hash" must be "sha256:" and 64 hex digits, not 65 characters`,
			line:  2,
		},
		{
			name:  "sha256 not hex",
			input: "api_key {\n\tkey x sha256:" + strings.Repeat("g", 64) + "\n}",
			want:  `key x: "hash" has a character that is not a hex digit`,
			line:  2,
		},
		{
			name:   "plaintext key with a space",
			input:  "api_key {\n\tkey ci \"top secret\"\n}",
			want:   "key ci: a key must be 1 to 512 visible ASCII characters",
			line:   2,
			secret: "secret",
		},
		{
			name:   "plaintext key too long",
			input:  "api_key {\n\tkey ci " + strings.Repeat("s", maxKeyLen+1) + "\n}",
			want:   "key ci: a key must be 1 to 512 visible ASCII characters",
			line:   2,
			secret: "sss",
		},
		{
			name:   "plaintext key with non-ASCII",
			input:  "api_key {\n\tkey ci sécret\n}",
			want:   "key ci: a key must be 1 to 512 visible ASCII characters",
			line:   2,
			secret: "sécret",
		},
		{
			name:  "rate without argument",
			input: "api_key {\n\tkeys_file k.json\n\trate\n}",
			want:  "wrong argument count or unexpected line ending after 'rate'",
			line:  3,
		},
		{
			name:  "rate without duration",
			input: "api_key {\n\tkeys_file k.json\n\trate 10\n}",
			want:  `rate "10": want <count>/<duration>, such as 600/1m`,
			line:  3,
		},
		{
			name:  "rate with zero count",
			input: "api_key {\n\tkeys_file k.json\n\trate 0/1m\n}",
			want:  `rate "0/1m": count must be a whole number from 1 to 1000000000`,
			line:  3,
		},
		{
			name:  "rate with a word for count",
			input: "api_key {\n\tkeys_file k.json\n\trate x/1m\n}",
			want:  `rate "x/1m": count must be a whole number from 1 to 1000000000`,
			line:  3,
		},
		{
			name:  "rate with zero duration",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/0s\n}",
			want:  `rate "10/0s": duration must be positive`,
			line:  3,
		},
		{
			name:  "rate with negative duration",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/-1m\n}",
			want:  `rate "10/-1m": duration must be positive`,
			line:  3,
		},
		{
			name:  "rate in nanoseconds",
			input: "api_key {\n\tkeys_file k.json\n\trate 1/1ns\n}",
			want:  `rate "1/1ns": duration units must be ms, s, m, h or d`,
			line:  3,
		},
		{
			name:  "rate below a millisecond",
			input: "api_key {\n\tkeys_file k.json\n\trate 1/0.5ms\n}",
			want:  `rate "1/0.5ms": duration must be at least 1ms`,
			line:  3,
		},
		{
			name:  "plan rate in microseconds",
			input: "api_key {\n\tkeys_file k.json\n\tplan free {\n\t\trate 1/1us\n\t}\n}",
			want:  `rate "1/1us": duration units must be ms, s, m, h or d`,
			line:  4,
		},
		{
			name:  "rate burst without number",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/1m burst\n}",
			want:  "rate: burst needs a number",
			line:  3,
		},
		{
			name:  "rate burst 0",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/1m burst 0\n}",
			want:  `rate: burst "0": must be a whole number from 1 to 1000000000`,
			line:  3,
		},
		{
			name:  "rate burst negative",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/1m burst -5\n}",
			want:  `rate: burst "-5": must be a whole number from 1 to 1000000000`,
			line:  3,
		},
		{
			name:  "rate burst not a number",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/1m burst lots\n}",
			want:  `rate: burst "lots": must be a whole number from 1 to 1000000000`,
			line:  3,
		},
		{
			name:  "rate with unknown option",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/1m foo 3\n}",
			want:  `rate: unexpected argument "foo" (want burst <n>)`,
			line:  3,
		},
		{
			name:  "rate with surplus argument after burst",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/1m burst 3 more\n}",
			want:  `rate: unexpected argument "more"`,
			line:  3,
		},
		{
			name:  "duplicate rate",
			input: "api_key {\n\tkeys_file k.json\n\trate 10/1m\n\trate 20/1m\n}",
			want:  "duplicate rate",
			line:  4,
		},
		{
			name:  "cache with an argument",
			input: "api_key {\n\tkeys_file k.json\n\tcache 10\n}",
			want:  `cache: unexpected argument "10" (settings go in a block)`,
			line:  3,
		},
		{
			name:  "cache unknown setting",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tsizes 10\n\t}\n}",
			want:  `cache: unknown setting "sizes"`,
			line:  4,
		},
		{
			name:  "cache setting without value",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tttl\n\t}\n}",
			want:  "wrong argument count or unexpected line ending after 'ttl'",
			line:  4,
		},
		{
			name:  "cache setting with surplus argument",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tsize 10 20\n\t}\n}",
			want:  `cache: size: unexpected argument "20"`,
			line:  4,
		},
		{
			name:  "cache duplicate setting",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tttl 1m\n\t\tttl 2m\n\t}\n}",
			want:  "cache: duplicate ttl",
			line:  5,
		},
		{
			name:  "cache size 0",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tsize 0\n\t}\n}",
			want:  `cache: size "0": must be a whole number from 1 to 16777216`,
			line:  4,
		},
		{
			name:  "cache size too large",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tsize 16777217\n\t}\n}",
			want:  `cache: size "16777217": must be a whole number from 1 to 16777216`,
			line:  4,
		},
		{
			name:  "cache size not a number",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tsize 1e3\n\t}\n}",
			want:  `cache: size "1e3": must be a whole number from 1 to 16777216`,
			line:  4,
		},
		{
			name:  "cache ttl negative",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tttl -1m\n\t}\n}",
			want:  `cache: ttl "-1m": must be a positive duration such as 30s`,
			line:  4,
		},
		{
			name:  "cache negative_ttl zero",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tnegative_ttl 0s\n\t}\n}",
			want:  `cache: negative_ttl "0s": must be a positive duration such as 30s`,
			line:  4,
		},
		{
			name:  "duplicate cache",
			input: "api_key {\n\tkeys_file k.json\n\tcache {\n\t\tsize 1\n\t}\n\tcache {\n\t\tsize 2\n\t}\n}",
			want:  "duplicate cache",
			line:  6,
		},
		{
			name:  "realm without argument",
			input: "api_key {\n\tkeys_file k.json\n\trealm\n}",
			want:  "wrong argument count or unexpected line ending after 'realm'",
			line:  3,
		},
		{
			name:  "realm with surplus argument",
			input: "api_key {\n\tkeys_file k.json\n\trealm a b\n}",
			want:  `realm: unexpected argument "b"`,
			line:  3,
		},
		{
			name:  "realm with a quote",
			input: "api_key {\n\tkeys_file k.json\n\trealm \"a\\\"b\"\n}",
			want:  `realm "a\"b": use printable ASCII characters other than quotes and backslash`,
			line:  3,
		},
		{
			name:  "duplicate realm",
			input: "api_key {\n\tkeys_file k.json\n\trealm a\n\trealm b\n}",
			want:  "duplicate realm",
			line:  4,
		},
		{
			name:  "pass_key with argument",
			input: "api_key {\n\tkeys_file k.json\n\tpass_key yes\n}",
			want:  `pass_key: unexpected argument "yes"`,
			line:  3,
		},
		{
			name:  "duplicate pass_key",
			input: "api_key {\n\tkeys_file k.json\n\tpass_key\n\tpass_key\n}",
			want:  "duplicate pass_key",
			line:  4,
		},
		{
			name:  "bad quota",
			input: "api_key {\n\tkeys_file k.json\n\tquota 5/fortnight\n}",
			want:  `quota "5/fortnight"`,
			line:  3,
		},
		{
			name:  "quota off on the directive",
			input: "api_key {\n\tkeys_file k.json\n\tquota off\n}",
			want:  `quota "off"`,
			line:  3,
		},
		{
			name:  "duplicate quota",
			input: "api_key {\n\tkeys_file k.json\n\tquota 1/day\n\tquota 2/day\n}",
			want:  "duplicate quota",
			line:  4,
		},
		{
			name:  "quota surplus argument",
			input: "api_key {\n\tkeys_file k.json\n\tquota 1/day x\n}",
			want:  `quota: unexpected argument "x"`,
			line:  3,
		},
		{
			name:  "plan without name",
			input: "api_key {\n\tkeys_file k.json\n\tplan\n}",
			want:  "plan: missing name",
			line:  3,
		},
		{
			name:  "plan bad name",
			input: "api_key {\n\tkeys_file k.json\n\tplan a/b\n}",
			want:  `plan name "a/b"`,
			line:  3,
		},
		{
			name:  "duplicate plan",
			input: "api_key {\n\tkeys_file k.json\n\tplan a\n\tplan a\n}",
			want:  `duplicate plan "a"`,
			line:  4,
		},
		{
			name:  "plan surplus argument",
			input: "api_key {\n\tkeys_file k.json\n\tplan a b\n}",
			want:  `plan a: unexpected argument "b"`,
			line:  3,
		},
		{
			name:  "plan unknown setting",
			input: "api_key {\n\tkeys_file k.json\n\tplan a {\n\t\tratez 1/s\n\t}\n}",
			want:  `plan a: unknown setting "ratez"`,
			line:  4,
		},
		{
			name:  "plan duplicate setting",
			input: "api_key {\n\tkeys_file k.json\n\tplan a {\n\t\tquota 1/day\n\t\tquota 2/day\n\t}\n}",
			want:  "plan a: duplicate quota",
			line:  5,
		},
		{
			name:  "plan bad rate",
			input: "api_key {\n\tkeys_file k.json\n\tplan a {\n\t\trate fast\n\t}\n}",
			want:  `rate "fast"`,
			line:  4,
		},
		{
			name:  "plan rate off with burst",
			input: "api_key {\n\tkeys_file k.json\n\tplan a {\n\t\trate off burst 2\n\t}\n}",
			want:  `rate off: unexpected argument "burst"`,
			line:  4,
		},
		{
			name:  "plan empty allow list",
			input: "api_key {\n\tkeys_file k.json\n\tplan a {\n\t\tallow_ips\n\t}\n}",
			want:  "plan a: allow_ips needs at least one value",
			line:  4,
		},
		{
			name:  "plan bad ip",
			input: "api_key {\n\tkeys_file k.json\n\tplan a {\n\t\tallow_ips 10.0.0.300\n\t}\n}",
			want:  `plan a: "allow_ips": "10.0.0.300" is not an IP address or CIDR prefix`,
			line:  4,
		},
		{
			name:  "plan relative path",
			input: "api_key {\n\tkeys_file k.json\n\tplan a {\n\t\tallow_paths v1\n\t}\n}",
			want:  `plan a: "allow_paths": "v1": a path pattern starts with /`,
			line:  4,
		},
		{
			name:  "bad prefix",
			input: "api_key {\n\tkeys_file k.json\n\tprefix sk-live\n}",
			want:  `prefix "sk-live"`,
			line:  3,
		},
		{
			name:  "duplicate prefix",
			input: "api_key {\n\tkeys_file k.json\n\tprefix sk\n\tprefix sk\n}",
			want:  `duplicate prefix "sk"`,
			line:  4,
		},
		{
			name:  "duplicate quota_file",
			input: "api_key {\n\tkeys_file k.json\n\tquota_file a\n\tquota_file b\n}",
			want:  "duplicate quota_file",
			line:  4,
		},
		{
			name:  "store unknown",
			input: "api_key {\n\tkeys_file k.json\n\tstore etcd\n}",
			want:  `store "etcd": want file or redis`,
			line:  3,
		},
		{
			name:  "limits unknown",
			input: "api_key {\n\tkeys_file k.json\n\tlimits global\n}",
			want:  `limits "global": want local or redis`,
			line:  3,
		},
		{
			name:  "refusals unknown",
			input: "api_key {\n\tkeys_file k.json\n\trefusals write\n}",
			want:  `refusals "write": want auto or errors`,
			line:  3,
		},
		{
			name:  "refusals twice",
			input: "api_key {\n\tkeys_file k.json\n\trefusals auto\n\trefusals errors\n}",
			want:  `refusals`,
			line:  4,
		},
		{
			name:  "on_limiter_error unknown",
			input: "api_key {\n\tkeys_file k.json\n\ton_limiter_error retry\n}",
			want:  `on_limiter_error "retry": want local or allow or deny`,
			line:  3,
		},
		{
			name:  "duplicate store",
			input: "api_key {\n\tkeys_file k.json\n\tstore file\n\tstore file\n}",
			want:  "duplicate store",
			line:  4,
		},
		{
			name:  "store redis without redis",
			input: "api_key {\n\tstore redis\n}",
			want:  "store redis and limits redis need a redis block",
			line:  3,
		},
		{
			name:  "redis unknown setting",
			input: "api_key {\n\tkeys_file k.json\n\tredis {\n\t\thost x\n\t}\n}",
			want:  `redis: unknown setting "host"`,
			line:  4,
		},
		{
			name:  "redis bad db",
			input: "api_key {\n\tkeys_file k.json\n\tredis {\n\t\tdb -1\n\t}\n}",
			want:  `redis: db "-1"`,
			line:  4,
		},
		{
			name:  "redis bad timeout",
			input: "api_key {\n\tkeys_file k.json\n\tredis {\n\t\ttimeout soon\n\t}\n}",
			want:  `redis: timeout "soon"`,
			line:  4,
		},
		{
			name:  "redis address without value",
			input: "api_key {\n\tkeys_file k.json\n\tredis {\n\t\taddress\n\t}\n}",
			want:  "redis: address needs at least one host:port",
			line:  4,
		},
		{
			name:  "redis duplicate setting",
			input: "api_key {\n\tkeys_file k.json\n\tredis {\n\t\tdb 1\n\t\tdb 2\n\t}\n}",
			want:  "redis: duplicate db",
			line:  5,
		},
		{
			name:   "redis password not echoed in a surplus-argument error",
			input:  "api_key {\n\tkeys_file k.json\n\tredis {\n\t\tpassword hunter2 extra\n\t}\n}",
			want:   `redis: password: unexpected argument "extra"`,
			line:   4,
			secret: "hunter2",
		},
		{
			name:  "no keys in a block",
			input: "api_key {\n\trealm r\n\tfrom bearer\n}",
			want:  "api_key: no keys; add keys_file <path> or key <id> <key>",
			line:  4,
		},
		{
			name:  "no keys and no block",
			input: "api_key",
			want:  "api_key: no keys; add keys_file <path> or key <id> <key>",
			line:  1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if err == nil {
				t.Fatalf("UnmarshalCaddyfile succeeded, want error %q", tt.want)
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.want) {
				t.Errorf("error = %q, want it to contain %q", msg, tt.want)
			}
			if loc := fmt.Sprintf(", at Testfile:%d", tt.line); !strings.HasSuffix(msg, loc) {
				t.Errorf("error = %q, want it to end with %q", msg, loc)
			}
			if tt.secret != "" && strings.Contains(msg, tt.secret) {
				t.Errorf("error = %q quotes the key", msg)
			}
		})
	}
}

// adaptCaddyfile adapts a Caddyfile to JSON and fails on any warning.
func adaptCaddyfile(t *testing.T, input string) map[string]any {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("no caddyfile adapter registered")
	}
	out, warnings, err := adapter.Adapt([]byte(dedent(input)), nil)
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("adapting warned: %v", warnings)
	}
	var cfg map[string]any
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatalf("adapted config is not JSON: %v\n%s", err, out)
	}
	return cfg
}

// dedent removes the indentation that the first line lacks and the others
// share, so that a Caddyfile written inside a test reads as formatted.
func dedent(s string) string {
	lines := strings.Split(s, "\n")
	indent := -1
	for _, l := range lines[1:] {
		if strings.TrimSpace(l) == "" {
			continue
		}
		if n := len(l) - len(strings.TrimLeft(l, "\t")); indent < 0 || n < indent {
			indent = n
		}
	}
	for i := 1; i < len(lines) && indent > 0; i++ {
		if len(lines[i]) >= indent {
			lines[i] = lines[i][indent:]
		}
	}
	return strings.Join(lines, "\n") + "\n"
}

// flatHandler is a handler of an adapted config with the matchers of the
// route that holds it, in the order the server runs them.
type flatHandler struct {
	obj   map[string]any
	match any
}

// flattenHandlers walks routes and subroutes depth first.
func flattenHandlers(t *testing.T, routes any, match any, out []flatHandler) []flatHandler {
	t.Helper()
	list, _ := routes.([]any)
	for _, r := range list {
		route, _ := r.(map[string]any)
		m := match
		if route["match"] != nil {
			m = route["match"]
		}
		handles, _ := route["handle"].([]any)
		for _, hv := range handles {
			h, _ := hv.(map[string]any)
			if h["handler"] == "subroute" {
				out = flattenHandlers(t, h["routes"], m, out)
				continue
			}
			out = append(out, flatHandler{obj: h, match: m})
		}
	}
	return out
}

func serverRoutes(t *testing.T, cfg map[string]any) any {
	t.Helper()
	apps, _ := cfg["apps"].(map[string]any)
	httpApp, _ := apps["http"].(map[string]any)
	servers, _ := httpApp["servers"].(map[string]any)
	if len(servers) != 1 {
		t.Fatalf("want one server, got %d: %v", len(servers), cfg)
	}
	for _, s := range servers {
		return s.(map[string]any)["routes"]
	}
	return nil
}

func mustJSON(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("bad JSON in test: %v\n%s", err, s)
	}
	return v
}

func TestAdaptCaddyfile(t *testing.T) {
	tests := []struct {
		name      string
		caddyfile string
		// handlers are the handler names of the site, in order.
		handlers []string
		// apiKey is the api_key handler object, match its route's matchers.
		apiKey string
		match  string
		// secret must not appear in the JSON.
		secret string
	}{
		{
			name: "directive order without order or route",
			caddyfile: `{
				admin off
			}
			:8080 {
				respond "hello"
				basic_auth /admin/* {
					Bob $2a$14$Zkx19XLiW6VYouLHR5NmfOFU0z2GTNmpkT/5qqR7hx4IjWJPDhjvG
				}
				api_key {
					keys_file /etc/caddy/keys.json
					key ci s3cret
				}
			}`,
			handlers: []string{"authentication", "api_key", "static_response"},
			apiKey: `{
				"handler": "api_key",
				"keys_file": "/etc/caddy/keys.json",
				"keys": [{"id": "ci", "key": "sha256:1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"}]
			}`,
			match:  `null`,
			secret: "s3cret",
		},
		{
			name: "matcher and every field",
			caddyfile: `example.com {
				header X-Served-By caddy
				reverse_proxy /api/* localhost:9000
				api_key /api/* {
					from query api_key
					from cookie session_key
					key ci {env.CI_KEY}
					key deploy ` + digestA + `
					rate 600/1m burst 50
					cache {
						size 10
						ttl 1m
						negative_ttl 5s
					}
					realm "my api"
					pass_key
				}
			}`,
			handlers: []string{"headers", "api_key", "reverse_proxy"},
			apiKey: `{
				"handler": "api_key",
				"from": [{"source": "query", "name": "api_key"}, {"source": "cookie", "name": "session_key"}],
				"keys": [{"id": "ci", "key": "{env.CI_KEY}"}, {"id": "deploy", "key": "` + digestA + `"}],
				"rate": "600/1m",
				"burst": 50,
				"cache": {"size": 10, "ttl": 60000000000, "negative_ttl": 5000000000},
				"realm": "my api",
				"pass_key": true
			}`,
			match: `[{"path": ["/api/*"]}]`,
		},
		{
			name: "api_key after basic_auth and before handle",
			caddyfile: `:8080 {
				handle /v1/* {
					respond "v1"
				}
				api_key {
					from bearer
					keys_file keys.json
				}
				basic_auth {
					Bob $2a$14$Zkx19XLiW6VYouLHR5NmfOFU0z2GTNmpkT/5qqR7hx4IjWJPDhjvG
				}
			}`,
			handlers: []string{"authentication", "api_key", "static_response"},
			apiKey: `{
				"handler": "api_key",
				"from": [{"source": "bearer"}],
				"keys_file": "keys.json"
			}`,
			match: `null`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := adaptCaddyfile(t, tt.caddyfile)
			flat := flattenHandlers(t, serverRoutes(t, cfg), nil, nil)
			var names []string
			var apiKey *flatHandler
			for i, h := range flat {
				names = append(names, fmt.Sprint(h.obj["handler"]))
				if h.obj["handler"] == "api_key" {
					if apiKey != nil {
						t.Errorf("two api_key handlers")
					}
					apiKey = &flat[i]
				}
			}
			if !reflect.DeepEqual(names, tt.handlers) {
				t.Errorf("handlers = %v, want %v", names, tt.handlers)
			}
			if apiKey == nil {
				t.Fatalf("no api_key handler in %v", cfg)
			}
			if want := mustJSON(t, tt.apiKey); !reflect.DeepEqual(apiKey.obj, want) {
				got, _ := json.Marshal(apiKey.obj)
				t.Errorf("api_key handler = %s, want %s", got, tt.apiKey)
			}
			// Round-trip the matcher through JSON so both sides have the
			// same types.
			gotMatch, _ := json.Marshal(apiKey.match)
			if !reflect.DeepEqual(mustJSON(t, string(gotMatch)), mustJSON(t, tt.match)) {
				t.Errorf("api_key route matchers = %s, want %s", gotMatch, tt.match)
			}
			if tt.secret != "" {
				js, _ := json.Marshal(cfg)
				if strings.Contains(string(js), tt.secret) {
					t.Errorf("the plaintext key appears in the adapted config")
				}
			}
		})
	}
}

func TestAdaptCaddyfileErrorLocation(t *testing.T) {
	// An error in a real Caddyfile names the file and the line of the
	// offending token.
	input := ":8080 {\n\tapi_key {\n\t\tkeys_file k.json\n\t\trate 10/1m burst 0\n\t}\n\trespond ok\n}\n"
	_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
	if err == nil {
		t.Fatal("adapting succeeded, want an error")
	}
	if want := `rate: burst "0": must be a whole number from 1 to 1000000000, at Caddyfile:4`; !strings.Contains(err.Error(), want) {
		t.Errorf("error = %q, want it to contain %q", err, want)
	}
}

func TestValidateRedisSettings(t *testing.T) {
	tests := []struct {
		name string
		h    Handler
		want string // "" for valid
	}{
		{"store redis", Handler{Store: "redis", Redis: &RedisConfig{}}, ""},
		{"store redis and inline keys", Handler{Store: "redis", Redis: &RedisConfig{}, Keys: []InlineKey{{ID: "a", Key: hashOf("k")}}}, ""},
		{"store redis without redis", Handler{Store: "redis"}, "store redis needs a redis block"},
		{"store redis and keys_file", Handler{Store: "redis", Redis: &RedisConfig{}, KeysFile: "k.json"}, "store redis and keys_file"},
		{"limits redis without redis", Handler{KeysFile: "k.json", Limits: "redis"}, "limits redis needs a redis block"},
		{"bad store", Handler{KeysFile: "k.json", Store: "etcd"}, `store "etcd"`},
		{"bad limits", Handler{KeysFile: "k.json", Limits: "x"}, `limits "x"`},
		{"bad on_store_error", Handler{KeysFile: "k.json", OnStoreError: "allow"}, `on_store_error "allow"`},
		{"bad on_limiter_error", Handler{KeysFile: "k.json", OnLimiterError: "retry"}, `on_limiter_error "retry"`},
		{"bad refusals", Handler{KeysFile: "k.json", Refusals: "write"}, `refusals "write": want auto or errors`},
		{"no keys at all", Handler{Redis: &RedisConfig{}}, "no keys"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.h.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("Validate = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
