package apikey

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"strings"

	"github.com/keystile/caddy-apikey/internal/quota"
	"github.com/keystile/caddy-apikey/internal/ratelimit"
)

// Plan is a named set of limits and restrictions. A key takes a plan with
// "plan": "<name>" in the keys file; any limit or restriction the key sets
// itself replaces the plan's.
type Plan struct {
	// Rate is the rate limit of the plan's keys, as "<count>/<duration>",
	// or "off" for none. Default: the handler's rate.
	Rate string `json:"rate,omitempty"`

	// Burst is how many requests a key may make at once under Rate.
	// Default: the count of Rate.
	Burst int64 `json:"burst,omitempty"`

	// Quota caps the calls of each of the plan's keys per UTC calendar
	// period, as "<count>/<hour|day|week|month>", or "off". Default: the
	// handler's quota.
	Quota string `json:"quota,omitempty"`

	Restrictions
}

// Restrictions pin a key to where it may be used. Each list that is set
// must match the request; an unset list allows everything.
type Restrictions struct {
	// AllowIPs lists the client addresses allowed, as CIDR prefixes or
	// single addresses. The client address is Caddy's, so trusted_proxies
	// is honoured. Default: any.
	AllowIPs []string `json:"allow_ips,omitempty"`

	// AllowReferrers lists URL patterns that the Referer header must
	// match: [scheme://]host[/path], such as "https://*.example.com/*".
	// The scheme, host and path are matched apart: a host of "*.example.com"
	// matches any subdomain of example.com (not example.com itself), "*"
	// any host; a path is a glob where * matches any run of characters,
	// and no path matches any; no scheme (or "*") means http or https. A
	// host without a port matches the Referer's host on any port. A
	// request without a Referer does not match. Default: any.
	AllowReferrers []string `json:"allow_referrers,omitempty"`

	// AllowMethods lists the HTTP methods allowed. Default: any.
	AllowMethods []string `json:"allow_methods,omitempty"`

	// AllowPaths lists the request paths allowed: a pattern without * is a
	// prefix that matches itself and what lies under it ("/v1" matches
	// "/v1" and "/v1/users", not "/v10"); with *, a glob where * matches
	// any run of characters, slashes included. Paths are cleaned first, so
	// "/v1/../admin" is "/admin", and a path holding "..;" (which some
	// backends read as "..") matches nothing. Default: any.
	AllowPaths []string `json:"allow_paths,omitempty"`
}

// Restriction names, as the log field's restriction says which failed.
const (
	restrictIP       = "ip"
	restrictReferrer = "referrer"
	restrictMethod   = "method"
	restrictPath     = "path"
)

// restrictions are compiled Restrictions. A nil list is unset; a set list
// is never empty.
type restrictions struct {
	ips       []netip.Prefix
	referrers []referrerPattern
	methods   []string
	paths     []string
}

// compileRestrictions checks and compiles r. Its errors name the field.
func compileRestrictions(r Restrictions) (restrictions, error) {
	var c restrictions
	if r.AllowIPs != nil {
		if len(r.AllowIPs) == 0 {
			return c, errors.New(`"allow_ips" is empty; leave it out to allow any address`)
		}
		for _, s := range r.AllowIPs {
			p, err := parsePrefix(s)
			if err != nil {
				return c, fmt.Errorf(`"allow_ips": %w`, err)
			}
			c.ips = append(c.ips, p)
		}
	}
	if r.AllowReferrers != nil {
		if len(r.AllowReferrers) == 0 {
			return c, errors.New(`"allow_referrers" is empty; leave it out to allow any`)
		}
		for _, s := range r.AllowReferrers {
			p, err := parseReferrerPattern(s)
			if err != nil {
				return c, fmt.Errorf(`"allow_referrers": %w`, err)
			}
			c.referrers = append(c.referrers, p)
		}
	}
	var err error
	if c.methods, err = compileList("allow_methods", r.AllowMethods, func(s string) (string, error) {
		if !validToken(s) {
			return "", fmt.Errorf("%q is not a method", s)
		}
		return strings.ToUpper(s), nil
	}); err != nil {
		return c, err
	}
	if c.paths, err = compileList("allow_paths", r.AllowPaths, func(s string) (string, error) {
		if !strings.HasPrefix(s, "/") {
			return "", fmt.Errorf("%q: a path pattern starts with /", s)
		}
		return s, nil
	}); err != nil {
		return c, err
	}
	return c, nil
}

func compileList(field string, in []string, compile func(string) (string, error)) ([]string, error) {
	if in == nil {
		return nil, nil
	}
	if len(in) == 0 {
		return nil, fmt.Errorf("%q is empty; leave it out to allow any", field)
	}
	out := make([]string, 0, len(in))
	for _, s := range in {
		c, err := compile(s)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", field, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// parsePrefix reads a CIDR prefix or a single address.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, fmt.Errorf("%q is not a CIDR prefix", s)
		}
		// Client addresses are compared unmapped, so an IPv4-mapped
		// prefix (::ffff:10.0.0.0/104) becomes the IPv4 one it means.
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				return p, fmt.Errorf("%q mixes IPv4-mapped and other IPv6 addresses; give the IPv4 prefix", s)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP address or CIDR prefix", s)
	}
	return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
}

// over returns the restrictions with each list that o sets taken from o.
func (r restrictions) over(o *restrictions) restrictions {
	if o.ips != nil {
		r.ips = o.ips
	}
	if o.referrers != nil {
		r.referrers = o.referrers
	}
	if o.methods != nil {
		r.methods = o.methods
	}
	if o.paths != nil {
		r.paths = o.paths
	}
	return r
}

func (r *restrictions) isZero() bool {
	return r.ips == nil && r.referrers == nil && r.methods == nil && r.paths == nil
}

// check returns the name of the first restriction the request fails, or
// "" when it passes them all. clientIP is Caddy's client address.
func (r *restrictions) check(req *http.Request, clientIP string) string {
	if r.methods != nil && !containsString(r.methods, req.Method) {
		return restrictMethod
	}
	if r.ips != nil {
		addr, err := netip.ParseAddr(clientIP)
		if err != nil || !containsAddr(r.ips, addr.Unmap()) {
			return restrictIP
		}
	}
	if r.paths != nil && !matchPaths(r.paths, req.URL.Path) {
		return restrictPath
	}
	if r.referrers != nil && !matchReferrer(r.referrers, req.Header.Get("Referer")) {
		return restrictReferrer
	}
	return ""
}

// referrerPattern is a compiled allow_referrers entry.
type referrerPattern struct {
	scheme string // lower case; "" for http or https
	host   string // lower case; "*" for any, "*.<domain>" for subdomains
	port   bool   // host names a port
	path   string // a glob; "" for any
}

// parseReferrerPattern reads [scheme://]host[/path].
func parseReferrerPattern(s string) (referrerPattern, error) {
	bad := func(why string) (referrerPattern, error) {
		return referrerPattern{}, fmt.Errorf("%q: %s; want a URL pattern such as https://*.example.com/*", s, why)
	}
	if s == "" || strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r >= 0x7f }) {
		return bad("empty or not printable ASCII")
	}
	var p referrerPattern
	rest := s
	if scheme, after, ok := strings.Cut(s, "://"); ok {
		if scheme != "*" {
			p.scheme = strings.ToLower(scheme)
		}
		rest = after
	}
	host, path, hasPath := strings.Cut(rest, "/")
	if hasPath {
		p.path = "/" + path
	}
	p.host = strings.ToLower(host)
	switch {
	case p.host == "":
		return bad("no host")
	case strings.ContainsAny(p.host, "?#@/\\"), strings.ContainsAny(p.path, "?#"):
		return bad("only scheme, host and path can be matched")
	case p.host != "*" && strings.Contains(strings.TrimPrefix(p.host, "*."), "*"):
		return bad(`a host may only start with "*." or be "*"`)
	}
	p.port = strings.Contains(strings.TrimPrefix(p.host, "*."), ":")
	return p, nil
}

// matchReferrer reports whether the Referer ref matches one of patterns.
// The URL is parsed, so that a pattern's host is matched against the
// Referer's host alone: https://evil.com/.example.com/ is not a subdomain
// of example.com.
func matchReferrer(patterns []referrerPattern, ref string) bool {
	if ref == "" {
		return false
	}
	u, err := url.Parse(ref)
	if err != nil || u.Host == "" || u.User != nil {
		return false
	}
	scheme := strings.ToLower(u.Scheme)
	for _, p := range patterns {
		if p.scheme == "" {
			if scheme != "http" && scheme != "https" {
				continue
			}
		} else if scheme != p.scheme {
			continue
		}
		host := strings.ToLower(u.Hostname())
		if p.port {
			host = strings.ToLower(u.Host)
		}
		switch {
		case p.host == "*":
		case strings.HasPrefix(p.host, "*."):
			if suffix := p.host[1:]; len(host) <= len(suffix) || !strings.HasSuffix(host, suffix) {
				continue
			}
		case host != p.host:
			continue
		}
		path := u.EscapedPath()
		if path == "" {
			path = "/"
		}
		if p.path == "" || globMatch(p.path, path) {
			return true
		}
	}
	return false
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func containsAddr(list []netip.Prefix, a netip.Addr) bool {
	for _, p := range list {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// matchPaths matches a request path against path patterns, after cleaning
// it so that dot segments cannot step out of an allowed prefix.
func matchPaths(patterns []string, p string) bool {
	if p == "" {
		p = "/"
	}
	// Some servers (Tomcat, Spring) read "..;" as "..": such a path
	// could step out of an allowed prefix behind Caddy's back.
	if strings.Contains(p, "..;") {
		return false
	}
	p = path.Clean(p)
	for _, pat := range patterns {
		if strings.Contains(pat, "*") {
			if globMatch(pat, p) {
				return true
			}
			continue
		}
		prefix := strings.TrimSuffix(pat, "/")
		if p == prefix || prefix == "" || strings.HasPrefix(p, prefix+"/") {
			return true
		}
	}
	return false
}

// globMatch reports whether s matches pattern, where * matches any run of
// characters (none included) and every other character itself. It runs in
// O(len(pattern)·len(s)) at worst and allocates nothing.
func globMatch(pattern, s string) bool {
	px, sx := 0, 0
	starPx, starSx := -1, 0
	for sx < len(s) {
		switch {
		case px < len(pattern) && pattern[px] == '*':
			starPx, starSx = px, sx
			px++
		case px < len(pattern) && pattern[px] == s[sx]:
			px++
			sx++
		case starPx >= 0:
			px = starPx + 1
			starSx++
			sx = starSx
		default:
			return false
		}
	}
	for px < len(pattern) && pattern[px] == '*' {
		px++
	}
	return px == len(pattern)
}

// plan is a compiled Plan.
type plan struct {
	name      string
	limitMode limitMode
	limit     ratelimit.Limit
	policy    policy
	quotaMode limitMode
	quota     quota.Quota
	restr     restrictions
}

// compilePlan checks and compiles a Plan.
func compilePlan(name string, p *Plan) (*plan, error) {
	if err := checkPlanName(name); err != nil {
		return nil, err
	}
	cp := &plan{name: name}
	if p == nil {
		return cp, nil
	}
	switch p.Rate {
	case "":
		if p.Burst != 0 {
			return nil, fmt.Errorf("plan %s: burst needs a rate", name)
		}
	case "off":
		if p.Burst != 0 {
			return nil, fmt.Errorf("plan %s: burst makes no sense with rate off", name)
		}
		cp.limitMode = limitOff
	default:
		lim, err := ratelimit.ParseRate(p.Rate)
		if err != nil {
			return nil, fmt.Errorf("plan %s: %w", name, err)
		}
		if p.Burst != 0 {
			if err := ratelimit.ValidateBurst(p.Burst); err != nil {
				return nil, fmt.Errorf("plan %s: burst: %w", name, err)
			}
			lim.Burst = p.Burst
		}
		cp.limitMode, cp.limit, cp.policy = limitOwn, lim, policyValue("plan", lim)
	}
	var err error
	if cp.quotaMode, cp.quota, err = parseQuotaSetting(p.Quota); err != nil {
		return nil, fmt.Errorf("plan %s: %w", name, err)
	}
	if cp.restr, err = compileRestrictions(p.Restrictions); err != nil {
		return nil, fmt.Errorf("plan %s: %w", name, err)
	}
	return cp, nil
}

// parseQuotaSetting reads a quota setting: "" (inherit), "off", or a quota.
func parseQuotaSetting(s string) (limitMode, quota.Quota, error) {
	switch s {
	case "":
		return limitInherit, quota.Quota{}, nil
	case "off":
		return limitOff, quota.Quota{}, nil
	}
	q, err := quota.Parse(s)
	if err != nil {
		return limitInherit, q, err
	}
	return limitOwn, q, nil
}

// checkPlanName accepts plan names that are safe in logs and headers.
func checkPlanName(name string) error {
	if name == "" || len(name) > 64 || !validMetadataName(name) {
		return fmt.Errorf("plan name %q: use 1 to 64 letters, digits, '_', '-' and '.'", name)
	}
	return nil
}
