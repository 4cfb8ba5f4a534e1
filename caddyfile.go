package apikey

import (
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/keystile/caddy-apikey/internal/keyformat"
	"github.com/keystile/caddy-apikey/internal/quota"
	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("api_key", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("api_key", httpcaddyfile.After, "basic_auth")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var handler Handler
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return &handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	api_key [<matcher>] {
//		from bearer | header <name> | query <param> | cookie <name>
//		keys_file <path>
//		key <id> <sha256:hex | plaintext>
//		rate <count>/<duration> [burst <n>]
//		quota <count>/<hour|day|week|month>
//		plan <name> {
//			rate <count>/<duration> [burst <n>] | off
//			quota <count>/<hour|day|week|month> | off
//			allow_ips <cidr>...
//			allow_referrers <pattern>...
//			allow_methods <method>...
//			allow_paths <pattern>...
//		}
//		prefix <prefix>
//		quota_file <path>
//		redis {
//			address <host:port>...
//			master_name <name>
//			username <name>
//			password <secret>
//			db <n>
//			tls
//			key_prefix <prefix>
//			timeout <duration>
//		}
//		store redis | file
//		limits redis | local
//		on_store_error deny | allow_cached
//		on_limiter_error local | allow | deny
//		metrics per_key [max_keys <n>]
//		name <label>
//		max_failures <count>/<duration> | off
//		cache {
//			size <n>
//			ttl <duration>
//			negative_ttl <duration>
//		}
//		realm <name>
//		refusals auto | errors
//		pass_key
//	}
//
// from, key, plan (with distinct names) and prefix may be repeated; every
// other subdirective may appear once.
// A literal plaintext key is hashed here, so the JSON config holds only its
// digest; a placeholder such as {env.CI_KEY} is kept and expanded at
// provision.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	once := func(name string) error {
		if seen[name] {
			return d.Errf("duplicate %s", name)
		}
		seen[name] = true
		return nil
	}
	for d.NextBlock(0) {
		switch name := d.Val(); name {
		case "from":
			var src KeySource
			if !d.NextArg() {
				return d.ArgErr()
			}
			src.Source = d.Val()
			switch src.Source {
			case "bearer":
			case "header", "query", "cookie":
				if !d.NextArg() {
					return d.Errf("from %s: missing name", src.Source)
				}
				src.Name = d.Val()
			default:
				return d.Errf("from: unknown source %q (want bearer, header, query or cookie)", src.Source)
			}
			if d.NextArg() {
				return d.Errf("from %s: unexpected argument %q", src.Source, d.Val())
			}
			if _, err := compileSource(src); err != nil {
				return d.Errf("%v", err)
			}
			for _, other := range h.From {
				if strings.EqualFold(other.Source, src.Source) && sameSourceName(src, other) {
					return d.Errf("duplicate from %s", src.String())
				}
			}
			h.From = append(h.From, src)

		case "keys_file":
			if err := once(name); err != nil {
				return err
			}
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.KeysFile = d.Val()
			if d.NextArg() {
				return d.Errf("keys_file: unexpected argument %q", d.Val())
			}

		case "key":
			// The tokens are not quoted in errors until they are known
			// to be an id: with the id forgotten, the first is the key.
			var k InlineKey
			args := d.RemainingArgs()
			switch {
			case len(args) == 0:
				return d.Err("key: missing id and key")
			case len(args) == 1:
				return d.Err("key: want <id> <key or sha256:hash>, got one argument (an unset {$VAR} leaves the key out)")
			case len(args) > 2:
				return d.Err("key: too many arguments; want <id> <key or sha256:hash>")
			case args[1] == "":
				return d.Err("key: the key is empty (is its {$VAR} set?)")
			}
			k.ID, k.Key = args[0], args[1]
			if checkID(k.ID) != nil {
				return d.Errf("key: invalid id: use 1 to 128 visible ASCII characters other than quotes and backslash")
			}
			switch {
			case hasDigestPrefix(k.Key):
				if _, err := parseDigest(k.Key); err != nil {
					return d.Errf("key %s: %v", k.ID, err)
				}
			case holdsPlaceholder(k.Key):
				// A placeholder, expanded at provision.
			default:
				if !validKey(k.Key) {
					return d.Errf("key %s: a key must be 1 to %d visible ASCII characters", k.ID, maxKeyLen)
				}
				k.Key = hashKey(k.Key)
			}
			for _, other := range h.Keys {
				if other.ID == k.ID {
					return d.Errf("duplicate key id %q", k.ID)
				}
			}
			h.Keys = append(h.Keys, k)

		case "rate":
			if err := once(name); err != nil {
				return err
			}
			rate, burst, err := parseRateArgs(d, false)
			if err != nil {
				return err
			}
			h.Rate, h.Burst = rate, burst

		case "quota":
			if err := once(name); err != nil {
				return err
			}
			q, err := parseQuotaArg(d, false)
			if err != nil {
				return err
			}
			h.Quota = q

		case "plan":
			if !d.NextArg() {
				return d.Err("plan: missing name")
			}
			planName := d.Val()
			if err := checkPlanName(planName); err != nil {
				return d.Errf("%v", err)
			}
			if d.NextArg() {
				return d.Errf("plan %s: unexpected argument %q (settings go in a block)", planName, d.Val())
			}
			if _, dup := h.Plans[planName]; dup {
				return d.Errf("duplicate plan %q", planName)
			}
			p, err := unmarshalPlan(d, planName)
			if err != nil {
				return err
			}
			if h.Plans == nil {
				h.Plans = make(map[string]*Plan)
			}
			h.Plans[planName] = p

		case "prefix":
			if !d.NextArg() {
				return d.ArgErr()
			}
			p := d.Val()
			if err := keyformat.ValidatePrefix(p); err != nil {
				return d.Errf("%v", err)
			}
			if slices.Contains(h.Prefixes, p) {
				return d.Errf("duplicate prefix %q", p)
			}
			if d.NextArg() {
				return d.Errf("prefix: unexpected argument %q", d.Val())
			}
			h.Prefixes = append(h.Prefixes, p)

		case "store", "limits", "on_store_error", "on_limiter_error", "refusals":
			if err := once(name); err != nil {
				return err
			}
			if !d.NextArg() {
				return d.ArgErr()
			}
			val := d.Val()
			allowed := map[string][]string{
				"store":            {"file", "redis"},
				"limits":           {"local", "redis"},
				"on_store_error":   {storeErrorDeny, storeErrorAllowCached},
				"on_limiter_error": {limiterErrorLocal, limiterErrorAllow, limiterErrorDeny},
				"refusals":         {refusalsAuto, refusalsErrors},
			}[name]
			if !slices.Contains(allowed, val) {
				return d.Errf("%s %q: want %s", name, val, strings.Join(allowed, " or "))
			}
			if d.NextArg() {
				return d.Errf("%s: unexpected argument %q", name, d.Val())
			}
			switch name {
			case "store":
				h.Store = val
			case "limits":
				h.Limits = val
			case "on_store_error":
				h.OnStoreError = val
			case "on_limiter_error":
				h.OnLimiterError = val
			case "refusals":
				h.Refusals = val
			}

		case "metrics":
			if err := once(name); err != nil {
				return err
			}
			if !d.NextArg() || d.Val() != "per_key" {
				return d.Err("metrics: want metrics per_key [max_keys <n>]")
			}
			h.Metrics = &MetricsConfig{PerKey: true}
			if d.NextArg() {
				if d.Val() != "max_keys" || !d.NextArg() {
					return d.Err("metrics: want metrics per_key [max_keys <n>]")
				}
				n, err := strconv.Atoi(d.Val())
				if err != nil || n < 1 {
					return d.Errf("metrics: max_keys %q: must be a whole number from 1", d.Val())
				}
				h.Metrics.MaxKeys = n
			}
			if d.NextArg() {
				return d.Errf("metrics: unexpected argument %q", d.Val())
			}

		case "redis":
			if err := once(name); err != nil {
				return err
			}
			if d.NextArg() {
				return d.Errf("redis: unexpected argument %q (settings go in a block)", d.Val())
			}
			h.Redis = new(RedisConfig)
			if err := h.Redis.unmarshalCaddyfile(d); err != nil {
				return err
			}

		case "max_failures":
			if err := once(name); err != nil {
				return err
			}
			if !d.NextArg() {
				return d.ArgErr()
			}
			if d.Val() != "off" {
				if _, err := ratelimit.ParseRate(d.Val()); err != nil {
					return d.Errf("max_failures: %v", err)
				}
			}
			h.MaxFailures = d.Val()
			if d.NextArg() {
				return d.Errf("max_failures: unexpected argument %q", d.Val())
			}

		case "name":
			if err := once(name); err != nil {
				return err
			}
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.Name = d.Val()
			if d.NextArg() {
				return d.Errf("name: unexpected argument %q", d.Val())
			}

		case "quota_file":
			if err := once(name); err != nil {
				return err
			}
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.QuotaFile = d.Val()
			if d.NextArg() {
				return d.Errf("quota_file: unexpected argument %q", d.Val())
			}

		case "cache":
			if err := once(name); err != nil {
				return err
			}
			if d.NextArg() {
				return d.Errf("cache: unexpected argument %q (settings go in a block)", d.Val())
			}
			h.Cache = new(CacheConfig)
			if err := h.Cache.unmarshalCaddyfile(d); err != nil {
				return err
			}

		case "realm":
			if err := once(name); err != nil {
				return err
			}
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.Realm = d.Val()
			if d.NextArg() {
				return d.Errf("realm: unexpected argument %q", d.Val())
			}
			if err := checkRealm(h.Realm); err != nil {
				return d.Errf("%v", err)
			}

		case "pass_key":
			if err := once(name); err != nil {
				return err
			}
			if d.NextArg() {
				return d.Errf("pass_key: unexpected argument %q", d.Val())
			}
			h.PassKey = true

		default:
			return d.Errf("unknown subdirective %q", name)
		}
	}
	if h.KeysFile == "" && len(h.Keys) == 0 && h.Store != "redis" {
		return d.Err("api_key: no keys; add keys_file <path> or key <id> <key>, or store redis")
	}
	if (h.Store == "redis" || h.Limits == "redis") && h.Redis == nil {
		return d.Err("api_key: store redis and limits redis need a redis block")
	}
	return nil
}

// holdsPlaceholder reports whether key holds an {env.*} or {file.*}
// placeholder as Caddy's replacer finds them at provision. A key that only
// contains "{env." is a literal key, to be hashed here.
func holdsPlaceholder(key string) bool {
	found := false
	repl := caddy.NewEmptyReplacer()
	repl.Map(func(name string) (any, bool) {
		if strings.HasPrefix(name, "env.") || strings.HasPrefix(name, "file.") {
			found = true
			return "", true
		}
		return nil, false
	})
	repl.ReplaceKnown(key, "")
	return found
}

// parseRateArgs reads the arguments of rate: <count>/<duration> [burst
// <n>], or off where allowOff.
func parseRateArgs(d *caddyfile.Dispenser, allowOff bool) (string, int64, error) {
	if !d.NextArg() {
		return "", 0, d.ArgErr()
	}
	rate := d.Val()
	if rate == "off" && allowOff {
		if d.NextArg() {
			return "", 0, d.Errf("rate off: unexpected argument %q", d.Val())
		}
		return rate, 0, nil
	}
	if _, err := ratelimit.ParseRate(rate); err != nil {
		return "", 0, d.Errf("%v", err)
	}
	var burst int64
	if d.NextArg() {
		if d.Val() != "burst" {
			return "", 0, d.Errf("rate: unexpected argument %q (want burst <n>)", d.Val())
		}
		if !d.NextArg() {
			return "", 0, d.Errf("rate: burst needs a number")
		}
		n, err := strconv.ParseInt(d.Val(), 10, 64)
		if err == nil {
			err = ratelimit.ValidateBurst(n)
		}
		if err != nil {
			return "", 0, d.Errf("rate: burst %q: must be a whole number from 1 to %d", d.Val(), ratelimit.MaxCount)
		}
		burst = n
	}
	if d.NextArg() {
		return "", 0, d.Errf("rate: unexpected argument %q", d.Val())
	}
	return rate, burst, nil
}

// parseQuotaArg reads the argument of quota: <count>/<period>, or off
// where allowOff.
func parseQuotaArg(d *caddyfile.Dispenser, allowOff bool) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	q := d.Val()
	if q != "off" || !allowOff {
		if _, err := quota.Parse(q); err != nil {
			return "", d.Errf("%v", err)
		}
	}
	if d.NextArg() {
		return "", d.Errf("quota: unexpected argument %q", d.Val())
	}
	return q, nil
}

// unmarshalPlan reads the block of plan <name>.
func unmarshalPlan(d *caddyfile.Dispenser, name string) (*Plan, error) {
	p := new(Plan)
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		setting := d.Val()
		if seen[setting] {
			return nil, d.Errf("plan %s: duplicate %s", name, setting)
		}
		seen[setting] = true
		var err error
		switch setting {
		case "rate":
			p.Rate, p.Burst, err = parseRateArgs(d, true)
		case "quota":
			p.Quota, err = parseQuotaArg(d, true)
		case "allow_ips", "allow_referrers", "allow_methods", "allow_paths":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return nil, d.Errf("plan %s: %s needs at least one value", name, setting)
			}
			var one Restrictions
			switch setting {
			case "allow_ips":
				p.AllowIPs, one.AllowIPs = args, args
			case "allow_referrers":
				p.AllowReferrers, one.AllowReferrers = args, args
			case "allow_methods":
				p.AllowMethods, one.AllowMethods = args, args
			case "allow_paths":
				p.AllowPaths, one.AllowPaths = args, args
			}
			if _, err := compileRestrictions(one); err != nil {
				return nil, d.Errf("plan %s: %v", name, err)
			}
		default:
			return nil, d.Errf("plan %s: unknown setting %q", name, setting)
		}
		if err != nil {
			return nil, err
		}
	}
	if _, err := compilePlan(name, p); err != nil {
		return nil, d.Errf("%v", err)
	}
	return p, nil
}

func sameSourceName(a, b KeySource) bool {
	if a.Source == "header" {
		return strings.EqualFold(a.Name, b.Name)
	}
	return a.Name == b.Name
}

func (rc *RedisConfig) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return d.Errf("redis: duplicate %s", name)
		}
		seen[name] = true
		if name == "address" {
			rc.Addresses = d.RemainingArgs()
			if len(rc.Addresses) == 0 {
				return d.Errf("redis: address needs at least one host:port")
			}
			continue
		}
		if name == "tls" {
			if d.NextArg() {
				return d.Errf("redis: tls: unexpected argument %q", d.Val())
			}
			rc.TLS = true
			continue
		}
		if !d.NextArg() {
			return d.Errf("redis: %s needs a value", name)
		}
		val := d.Val()
		switch name {
		case "master_name":
			rc.MasterName = val
		case "username":
			rc.Username = val
		case "password":
			rc.Password = val
		case "db":
			n, err := strconv.Atoi(val)
			if err != nil || n < 0 {
				return d.Errf("redis: db %q: must be a whole number from 0", val)
			}
			rc.DB = n
		case "key_prefix":
			rc.KeyPrefix = val
		case "timeout":
			dur, err := caddy.ParseDuration(val)
			if err != nil || dur <= 0 {
				return d.Errf("redis: timeout %q: must be a positive duration such as 50ms", val)
			}
			rc.Timeout = caddy.Duration(dur)
		default:
			return d.Errf("redis: unknown setting %q", name)
		}
		if d.NextArg() {
			return d.Errf("redis: %s: unexpected argument %q", name, d.Val())
		}
	}
	return nil
}

func (c *CacheConfig) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return d.Errf("cache: duplicate %s", name)
		}
		seen[name] = true
		if !d.NextArg() {
			return d.ArgErr()
		}
		val := d.Val()
		switch name {
		case "size":
			n, err := strconv.ParseInt(val, 10, 64)
			if err != nil || n < 1 || n > maxCacheSize {
				return d.Errf("cache: size %q: must be a whole number from 1 to %d", val, maxCacheSize)
			}
			c.Size = n
		case "ttl", "negative_ttl":
			dur, err := caddy.ParseDuration(val)
			if err != nil || dur <= 0 {
				return d.Errf("cache: %s %q: must be a positive duration such as 30s", name, val)
			}
			if name == "ttl" {
				c.TTL = caddy.Duration(dur)
			} else {
				c.NegativeTTL = caddy.Duration(dur)
			}
		default:
			return d.Errf("cache: unknown setting %q", name)
		}
		if d.NextArg() {
			return d.Errf("cache: %s: unexpected argument %q", name, d.Val())
		}
	}
	return nil
}
