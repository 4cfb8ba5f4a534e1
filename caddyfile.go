package apikey

import (
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

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
//		cache {
//			size <n>
//			ttl <duration>
//			negative_ttl <duration>
//		}
//		realm <name>
//		pass_key
//	}
//
// from and key may be repeated; every other subdirective may appear once.
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
			case strings.Contains(k.Key, "{env.") || strings.Contains(k.Key, "{file."):
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
			if !d.NextArg() {
				return d.ArgErr()
			}
			if _, err := ratelimit.ParseRate(d.Val()); err != nil {
				return d.Errf("%v", err)
			}
			h.Rate = d.Val()
			if d.NextArg() {
				if d.Val() != "burst" {
					return d.Errf("rate: unexpected argument %q (want burst <n>)", d.Val())
				}
				if !d.NextArg() {
					return d.Errf("rate: burst needs a number")
				}
				n, err := strconv.ParseInt(d.Val(), 10, 64)
				if err == nil {
					err = ratelimit.ValidateBurst(n)
				}
				if err != nil {
					return d.Errf("rate: burst %q: must be a whole number from 1 to %d", d.Val(), ratelimit.MaxCount)
				}
				h.Burst = n
			}
			if d.NextArg() {
				return d.Errf("rate: unexpected argument %q", d.Val())
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
	if h.KeysFile == "" && len(h.Keys) == 0 {
		return d.Err("api_key: no keys; add keys_file <path> or key <id> <key>")
	}
	return nil
}

func sameSourceName(a, b KeySource) bool {
	if a.Source == "header" {
		return strings.EqualFold(a.Name, b.Name)
	}
	return a.Name == b.Name
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
