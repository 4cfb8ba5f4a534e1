package apikey

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// FuzzUnmarshalCaddyfile feeds arbitrary text to the api_key directive's
// parser. Whatever the text, the parser must not panic; an error must come
// from the dispenser, with the file and line; and a handler it accepts
// must survive printing: parse → print → parse gives the same JSON config
// (and the same text when printed again), as does JSON → Go → JSON.
//
// The seeds are every api_key block of the README, of examples/ and of
// caddyfile_test.go, so that the fuzzer starts from the syntax as written.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, seed := range caddyfileSeeds(f) {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, input string) {
		// The lexer's errors are Caddy's: the adapter reports them before
		// any directive parses.
		tokens, err := caddyfile.Tokenize([]byte(input), "Testfile")
		if err != nil || len(tokens) == 0 {
			return
		}
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
			checkLocation(t, err, tokens)
			return
		}
		want, err := json.Marshal(&h)
		if err != nil {
			t.Fatalf("marshaling the parsed handler: %v", err)
		}
		// A key the parser did not hash must be a digest or hold a
		// placeholder: a literal key never reaches the JSON config.
		for _, k := range h.Keys {
			if !hasDigestPrefix(k.Key) && !expandsPlaceholder(k.Key) {
				t.Fatalf("key %s is kept as written, %q, but holds no placeholder", k.ID, k.Key)
			}
		}

		printed, err := printCaddyfile(&h)
		if errors.Is(err, errUnprintable) {
			t.Skip(err)
		}
		if err != nil {
			t.Fatalf("printing %s: %v", want, err)
		}
		again := parseCaddyfileText(t, printed)
		if got, _ := json.Marshal(again); !bytes.Equal(got, want) {
			t.Fatalf("parse → print → parse changed the config\ninput:   %q\nprinted: %q\nfirst:   %s\nsecond:  %s", input, printed, want, got)
		}
		if reprinted, err := printCaddyfile(again); err != nil || reprinted != printed {
			t.Fatalf("printing the reparsed handler gave %q (%v), want %q", reprinted, err, printed)
		}

		var fromJSON Handler
		if err := json.Unmarshal(want, &fromJSON); err != nil {
			t.Fatalf("unmarshaling %s: %v", want, err)
		}
		if got, _ := json.Marshal(&fromJSON); !bytes.Equal(got, want) {
			t.Fatalf("JSON round trip changed the config\nfirst:  %s\nsecond: %s", want, got)
		}
	})
}

// expandsPlaceholder reports whether Caddy's global replacer, as Provision
// uses it, changes s: an independent check of the parser's
// holdsPlaceholder, which asks a replacer of its own. An {env.*} or
// {file.*} placeholder changes s even when the variable or the file does
// not exist (it becomes empty).
func expandsPlaceholder(s string) bool {
	return caddy.NewReplacer().ReplaceKnown(s, "") != s
}

// errLocation is the end of a dispenser's error: ", at <file>:<line>".
var errLocation = regexp.MustCompile(`, at Testfile:(\d+)$`)

// checkLocation checks that err names the file and a line of the input.
func checkLocation(t *testing.T, err error, tokens []caddyfile.Token) {
	t.Helper()
	m := errLocation.FindStringSubmatch(err.Error())
	if m == nil {
		t.Fatalf("error %q does not end with \", at Testfile:<line>\"", err)
	}
	last := tokens[len(tokens)-1]
	line, _ := strconv.Atoi(m[1])
	if line < 1 || line > last.Line+last.NumLineBreaks() {
		t.Fatalf("error %q: line %d is outside the input's lines 1 to %d", err, line, last.Line+last.NumLineBreaks())
	}
}

// parseCaddyfileText parses text that must be valid.
func parseCaddyfileText(t *testing.T, text string) *Handler {
	t.Helper()
	tokens, err := caddyfile.Tokenize([]byte(text), "Testfile")
	if err != nil {
		t.Fatalf("tokenizing the printed Caddyfile %q: %v", text, err)
	}
	h := new(Handler)
	if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
		t.Fatalf("parsing the printed Caddyfile %q: %v", text, err)
	}
	return h
}

// errUnprintable is a value that no Caddyfile token can hold as it is.
var errUnprintable = errors.New("not printable as a Caddyfile token")

// printCaddyfile renders h as an api_key directive that parses back to h:
// every field that UnmarshalCaddyfile sets, each value quoted. It is for
// tests only; a field it does not know makes TestPrintCaddyfileEveryField
// fail.
func printCaddyfile(h *Handler) (string, error) {
	p := &cfPrinter{}
	p.line(0, "api_key {")
	for _, s := range h.From {
		if s.Name == "" {
			p.line(1, "from", s.Source)
		} else {
			p.line(1, "from", s.Source, s.Name)
		}
	}
	p.opt(1, "keys_file", h.KeysFile)
	for _, k := range h.Keys {
		p.line(1, "key", k.ID, k.Key)
	}
	if h.Burst != 0 && h.Rate == "" {
		return "", errors.New("burst without rate")
	}
	p.rate(1, h.Rate, h.Burst)
	p.opt(1, "quota", h.Quota)
	names := make([]string, 0, len(h.Plans))
	for name := range h.Plans {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		pl := h.Plans[name]
		if pl.Burst != 0 && (pl.Rate == "" || pl.Rate == "off") {
			return "", fmt.Errorf("plan %s: burst without rate", name)
		}
		p.line(1, "plan", name, "{")
		p.rate(2, pl.Rate, pl.Burst)
		p.opt(2, "quota", pl.Quota)
		p.list(2, "allow_ips", pl.AllowIPs)
		p.list(2, "allow_referrers", pl.AllowReferrers)
		p.list(2, "allow_methods", pl.AllowMethods)
		p.list(2, "allow_paths", pl.AllowPaths)
		p.line(1, "}")
	}
	for _, prefix := range h.Prefixes {
		p.line(1, "prefix", prefix)
	}
	p.opt(1, "quota_file", h.QuotaFile)
	if rc := h.Redis; rc != nil {
		p.line(1, "redis", "{")
		p.list(2, "address", rc.Addresses)
		p.opt(2, "master_name", rc.MasterName)
		p.opt(2, "username", rc.Username)
		p.opt(2, "password", rc.Password)
		if rc.DB != 0 {
			p.line(2, "db", strconv.Itoa(rc.DB))
		}
		if rc.TLS {
			p.line(2, "tls")
		}
		p.opt(2, "key_prefix", rc.KeyPrefix)
		p.duration(2, "timeout", rc.Timeout)
		p.line(1, "}")
	}
	p.opt(1, "store", h.Store)
	p.opt(1, "limits", h.Limits)
	p.opt(1, "on_store_error", h.OnStoreError)
	p.opt(1, "on_limiter_error", h.OnLimiterError)
	if m := h.Metrics; m != nil {
		switch {
		case !m.PerKey:
			return "", errors.New("metrics without per_key")
		case m.MaxKeys != 0:
			p.line(1, "metrics", "per_key", "max_keys", strconv.Itoa(m.MaxKeys))
		default:
			p.line(1, "metrics", "per_key")
		}
	}
	p.opt(1, "name", h.Name)
	p.opt(1, "max_failures", h.MaxFailures)
	if c := h.Cache; c != nil {
		p.line(1, "cache", "{")
		if c.Size != 0 {
			p.line(2, "size", strconv.FormatInt(c.Size, 10))
		}
		p.duration(2, "ttl", c.TTL)
		p.duration(2, "negative_ttl", c.NegativeTTL)
		p.line(1, "}")
	}
	p.opt(1, "realm", h.Realm)
	p.opt(1, "refusals", h.Refusals)
	if h.PassKey {
		p.line(1, "pass_key")
	}
	p.line(0, "}")
	if p.err != nil {
		return "", p.err
	}
	return p.b.String(), nil
}

// cfPrinter writes Caddyfile lines. The first word of a line and a "{"
// that ends it are written as they are; every other word is quoted.
type cfPrinter struct {
	b   strings.Builder
	err error
}

func (p *cfPrinter) line(depth int, name string, args ...string) {
	p.b.WriteString(strings.Repeat("\t", depth))
	p.b.WriteString(name)
	for i, a := range args {
		p.b.WriteByte(' ')
		if a == "{" && i == len(args)-1 {
			p.b.WriteString(a)
			continue
		}
		q, err := quoteToken(a)
		if err != nil && p.err == nil {
			p.err = fmt.Errorf("%s: %w", name, err)
		}
		p.b.WriteString(q)
	}
	p.b.WriteByte('\n')
}

// opt writes a line for a setting that is set.
func (p *cfPrinter) opt(depth int, name, val string) {
	if val != "" {
		p.line(depth, name, val)
	}
}

// list writes a line for a list that is set.
func (p *cfPrinter) list(depth int, name string, vals []string) {
	if vals != nil {
		p.line(depth, name, vals...)
	}
}

func (p *cfPrinter) rate(depth int, rate string, burst int64) {
	switch {
	case rate == "":
	case burst != 0:
		p.line(depth, "rate", rate, "burst", strconv.FormatInt(burst, 10))
	default:
		p.line(depth, "rate", rate)
	}
}

func (p *cfPrinter) duration(depth int, name string, d caddy.Duration) {
	if d != 0 {
		p.line(depth, name, time.Duration(d).String())
	}
}

// quoteToken quotes v so that Caddy's lexer reads it back as one token
// with the text v. Backticks keep everything but a backtick; double
// quotes keep everything but a backslash before a quote or at the end;
// a heredoc keeps everything but a carriage return.
func quoteToken(v string) (string, error) {
	if !strings.Contains(v, "`") {
		return "`" + v + "`", nil
	}
	if !strings.Contains(v, `\"`) && !strings.HasSuffix(v, `\`) {
		return `"` + strings.ReplaceAll(v, `"`, `\"`) + `"`, nil
	}
	if strings.Contains(v, "\r") {
		return "", fmt.Errorf("%q: %w", v, errUnprintable)
	}
	marker := "END"
	for i := 0; strings.Contains(v, marker); i++ {
		marker = "END" + strconv.Itoa(i)
	}
	return "<<" + marker + "\n" + v + "\n" + marker, nil
}

// TestPrintCaddyfileEveryField gives every field of the handler's JSON
// config a value, prints it and parses it back: a field the printer
// leaves out fails here, and so does a new field nobody taught it.
func TestPrintCaddyfileEveryField(t *testing.T) {
	h := Handler{
		From:     []KeySource{{Source: "bearer"}, {Source: "header", Name: "X-Key"}, {Source: "query", Name: "k y"}},
		KeysFile: "/etc/caddy/keys file.json",
		Keys:     []InlineKey{{ID: "ci", Key: "{env.CI_KEY}"}, {ID: "deploy", Key: digestA}},
		Rate:     "600/1m",
		Burst:    50,
		Quota:    "1000/day",
		Plans: map[string]*Plan{
			"free": {Rate: "10/1m", Burst: 2, Quota: "100/day", Restrictions: Restrictions{
				AllowIPs:       []string{"10.0.0.0/8", "::1"},
				AllowReferrers: []string{"https://*.example.com/*"},
				AllowMethods:   []string{"GET", "HEAD"},
				AllowPaths:     []string{"/v1", "/files/*.png"},
			}},
			"gold": {Rate: "off", Quota: "off"},
		},
		Prefixes:  []string{"sk_live", "pk"},
		QuotaFile: "/var/lib/caddy/q.db",
		Redis: &RedisConfig{Addresses: []string{"10.0.0.1:6379", "10.0.0.2:6379"}, MasterName: "main",
			Username: "caddy", Password: "a \"quoted\" `password`\\", DB: 2, TLS: true, KeyPrefix: "site1:",
			Timeout: caddy.Duration(80 * time.Millisecond)},
		Store:          "redis",
		Limits:         "redis",
		OnStoreError:   "allow_cached",
		OnLimiterError: "deny",
		MaxFailures:    "20/1m",
		Name:           "example.com",
		Metrics:        &MetricsConfig{PerKey: true, MaxKeys: 10},
		Cache:          &CacheConfig{Size: 7, TTL: caddy.Duration(90 * time.Second), NegativeTTL: caddy.Duration(36 * time.Hour)},
		Realm:          "my api",
		Refusals:       "errors",
		PassKey:        true,
	}
	checkEveryFieldSet(t, reflect.ValueOf(h), "Handler")

	printed, err := printCaddyfile(&h)
	if err != nil {
		t.Fatalf("printCaddyfile: %v", err)
	}
	want, got := mustMarshal(t, &h), mustMarshal(t, parseCaddyfileText(t, printed))
	if !bytes.Equal(got, want) {
		t.Errorf("printed and parsed back:\n%s\nwant:\n%s\nprinted:\n%s", got, want, printed)
	}
}

// checkEveryFieldSet fails for an exported field of v, or of a struct,
// pointer, slice or map in it, that holds its zero value.
func checkEveryFieldSet(t *testing.T, v reflect.Value, path string) {
	t.Helper()
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			t.Errorf("%s is nil: give it a value", path)
			return
		}
		checkEveryFieldSet(t, v.Elem(), path)
	case reflect.Struct:
		for i := range v.NumField() {
			if f := v.Type().Field(i); f.IsExported() {
				checkEveryFieldSet(t, v.Field(i), path+"."+f.Name)
			}
		}
	case reflect.Slice, reflect.Map:
		if v.Len() == 0 {
			t.Errorf("%s is empty: give it a value", path)
		}
		// The last element must have every field set; the others may
		// show other forms (from bearer has no name).
		if v.Kind() == reflect.Slice && v.Len() > 0 {
			checkEveryFieldSet(t, v.Index(v.Len()-1), fmt.Sprintf("%s[%d]", path, v.Len()-1))
		}
	default:
		if v.IsZero() {
			t.Errorf("%s is zero: give it a value", path)
		}
	}
}

func TestQuoteToken(t *testing.T) {
	for _, v := range []string{"", "plain", "with space", "#hash", "{", "}", "<<EOF", "a\nb", "tab\there",
		"back`tick", "back`tick \"quote\"", "back`tick \\\" both", "trailing`\\", "END`\\\"END0", "ключ"} {
		q, err := quoteToken(v)
		if err != nil {
			t.Errorf("quoteToken(%q): %v", v, err)
			continue
		}
		tokens, err := caddyfile.Tokenize([]byte("name "+q+" next\n"), "Testfile")
		if err != nil {
			t.Errorf("quoteToken(%q) = %q: %v", v, q, err)
			continue
		}
		if len(tokens) != 3 || tokens[1].Text != v || tokens[2].Text != "next" {
			t.Errorf("quoteToken(%q) = %q, read back as %+v", v, q, tokens)
		}
	}
	if _, err := quoteToken("`\\\"\r"); !errors.Is(err, errUnprintable) {
		t.Errorf("a backtick, a backslash before a quote and a carriage return: err = %v, want errUnprintable", err)
	}
}

// caddyfileSeeds returns the api_key blocks of the README, examples/ and
// caddyfile_test.go, each as written and with its matcher taken off (as
// Caddy's adapter does before the directive parses).
func caddyfileSeeds(t testing.TB) []string {
	t.Helper()
	var texts []string
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	texts = append(texts, markdownBlocks(string(readme), "caddy")...)
	examples, err := filepath.Glob(filepath.Join("examples", "*", "Caddyfile"))
	if err != nil || len(examples) == 0 {
		t.Fatalf("no examples/*/Caddyfile: %v", err)
	}
	for _, path := range examples {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		texts = append(texts, string(data))
	}
	texts = append(texts, goStrings(t, "caddyfile_test.go")...)

	var seeds []string
	seen := make(map[string]bool)
	add := func(s string) {
		if !seen[s] {
			seen[s] = true
			seeds = append(seeds, s)
		}
	}
	for _, text := range texts {
		// A test's input that the lexer refuses is a seed as it is.
		if strings.HasPrefix(strings.TrimSpace(text), "api_key") {
			add(text)
		}
		for _, block := range apiKeyBlocks(text) {
			add(block)
		}
	}
	if len(seeds) < 50 {
		t.Fatalf("only %d seeds; the extraction is broken", len(seeds))
	}
	return seeds
}

// markdownBlocks returns the fenced code blocks whose language starts
// with lang.
func markdownBlocks(md, lang string) []string {
	var blocks []string
	var cur []string
	in := false
	for l := range strings.Lines(md) {
		fence, isFence := strings.CutPrefix(strings.TrimRight(l, "\n"), "```")
		switch {
		case isFence && in:
			blocks = append(blocks, strings.Join(cur, ""))
			cur, in = nil, false
		case isFence && strings.HasPrefix(fence, lang):
			in = true
		case in:
			cur = append(cur, l)
		}
	}
	return blocks
}

// apiKeyBlocks returns each api_key directive of a Caddyfile, from its
// line to the line of its closing brace: as written, and with the first
// line reduced to "api_key {" (no matcher).
func apiKeyBlocks(text string) []string {
	tokens, err := caddyfile.Tokenize([]byte(text), "Testfile")
	if err != nil {
		return nil
	}
	lines := strings.SplitAfter(text, "\n")
	endLine := func(tk caddyfile.Token) int { return tk.Line + tk.NumLineBreaks() }
	var blocks []string
	for i, tk := range tokens {
		if tk.Text != "api_key" || tk.Quoted() || (i > 0 && endLine(tokens[i-1]) >= tk.Line) {
			continue
		}
		// Find the end of the line, then of the block that it opens.
		j := i
		for j+1 < len(tokens) && endLine(tokens[j]) >= tokens[j+1].Line {
			j++
		}
		last := j
		if tokens[j].Text == "{" && !tokens[j].Quoted() {
			depth := 0
			for last = j; last < len(tokens); last++ {
				t := tokens[last]
				atEnd := last+1 == len(tokens) || endLine(t) < tokens[last+1].Line
				if t.Quoted() || !atEnd {
					continue
				}
				if t.Text == "{" {
					depth++
				} else if t.Text == "}" {
					if depth--; depth == 0 {
						break
					}
				}
			}
			last = min(last, len(tokens)-1)
		}
		first, end := tk.Line, endLine(tokens[last])
		if first < 1 || end > len(lines) {
			continue
		}
		block := strings.Join(lines[first-1:end], "")
		blocks = append(blocks, block)
		if j > i {
			head := "api_key"
			if tokens[j].Text == "{" {
				head += " {"
			}
			_, rest, _ := strings.Cut(block, "\n")
			blocks = append(blocks, head+"\n"+rest)
		}
	}
	return blocks
}

// goStrings returns the string constants of a Go file that mention
// api_key: literals and sums of them, with a named constant of the file
// put in and a call left as "x".
func goStrings(t testing.TB, path string) []string {
	t.Helper()
	fset := token.NewFileSet()
	file, err := parser.ParseFile(fset, path, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	consts := make(map[string]ast.Expr)
	for _, decl := range file.Decls {
		if gd, ok := decl.(*ast.GenDecl); ok && gd.Tok == token.CONST {
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, name := range vs.Names {
					if i < len(vs.Values) {
						consts[name.Name] = vs.Values[i]
					}
				}
			}
		}
	}
	var eval func(e ast.Expr) (string, bool)
	eval = func(e ast.Expr) (string, bool) {
		switch e := e.(type) {
		case *ast.BasicLit:
			if e.Kind != token.STRING {
				return "", false
			}
			s, err := strconv.Unquote(e.Value)
			return s, err == nil
		case *ast.BinaryExpr:
			if e.Op != token.ADD {
				return "", false
			}
			x, okX := eval(e.X)
			y, okY := eval(e.Y)
			return x + y, okX && okY
		case *ast.ParenExpr:
			return eval(e.X)
		case *ast.Ident:
			if c, ok := consts[e.Name]; ok {
				return eval(c)
			}
		case *ast.CallExpr:
			return "x", true
		}
		return "", false
	}
	var out []string
	ast.Inspect(file, func(n ast.Node) bool {
		e, ok := n.(ast.Expr)
		if !ok {
			return true
		}
		if _, isCall := e.(*ast.CallExpr); isCall {
			return true // its arguments may be strings
		}
		s, ok := eval(e)
		if ok && strings.Contains(s, "api_key") {
			out = append(out, s)
		}
		return !ok
	})
	return out
}
