package report

import (
	"bytes"
	"encoding/binary"
	"math"
	"strconv"
	"time"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// entry is what the report reads from one log line. Its byte slices point
// into the line (or, for a string with escapes, into a fresh copy), so an
// entry is good only until the next line is read.
//
// Why not encoding/json: decoding a typical access-log line (about 900
// bytes, most of it headers the report never looks at) into a struct runs
// at about 80,000 lines per second, because the decoder checks the whole
// line, then decodes it with reflection. This parser checks and skips in
// one pass and converts only the few values it keeps; see BenchmarkReport.
type entry struct {
	logger, msg       []byte
	hasLogger, hasMsg bool

	ts       float64 // unix seconds
	hasTS    bool
	status   int
	size     int64
	duration float64 // seconds
	hasDur   bool

	hasRequest bool
	uri        []byte
	keyID      []byte // api_key.id
	plan       []byte // api_key.plan

	// p is the parser of the line, kept here so that it need not be
	// allocated for each line: fields calls functions that it cannot
	// see through, so escape analysis moves it to the heap.
	p parser
}

// lineKind is what a line turned out to be.
type lineKind uint8

const (
	// kindInvalid is a line that is not JSON, or JSON that is not a
	// Caddy log entry (an object with a string msg), or an entry whose
	// known fields have the wrong types.
	kindInvalid lineKind = iota
	// kindOther is a Caddy log entry of another logger than the access
	// log's, or of the access logger but not about a request.
	kindOther
	// kindAccess is an access-log entry: msg "handled request", from a
	// logger named http.log.access[.*] (or unnamed), with a request.
	kindAccess
)

// parseLine reads line into e and says what kind of line it is.
func parseLine(line []byte, e *entry) lineKind {
	*e = entry{p: parser{b: line, scratch: e.p.scratch[:0]}}
	p := &e.p
	p.ws()
	if !p.fields(e.topField) {
		return kindInvalid
	}
	p.ws()
	if p.i != len(p.b) || !e.hasMsg {
		return kindInvalid
	}
	accessLogger := !e.hasLogger || string(e.logger) == "http.log.access" ||
		bytes.HasPrefix(e.logger, []byte("http.log.access."))
	if !accessLogger || string(e.msg) != "handled request" {
		return kindOther
	}
	if !e.hasRequest {
		return kindInvalid
	}
	return kindAccess
}

// topField reads the value of one member of the line's object.
func (e *entry) topField(p *parser, key []byte) bool {
	var ok bool
	switch string(key) {
	case "logger":
		e.logger, ok = p.string()
		e.hasLogger = true
	case "msg":
		e.msg, ok = p.string()
		e.hasMsg = true
	case "ts":
		e.ts, e.hasTS, ok = p.timestamp()
	case "status":
		var f float64
		f, ok = p.float()
		if ok && (f != math.Trunc(f) || f < 0 || f > 999) {
			return false
		}
		e.status = int(f)
	case "size":
		var f float64
		f, ok = p.float()
		if ok && (f != math.Trunc(f) || f < 0 || f > math.MaxInt64/2) {
			return false
		}
		e.size = int64(f)
	case "duration":
		e.duration, e.hasDur, ok = p.duration()
	case "request":
		e.hasRequest = true
		ok = p.peek() == '{' && p.fields(e.requestField)
	case "api_key":
		if p.null() {
			e.keyID, e.plan = nil, nil
			return true
		}
		ok = p.peek() == '{' && p.fields(e.apiKeyField)
	default:
		ok = p.skip()
	}
	return ok
}

func (e *entry) requestField(p *parser, key []byte) bool {
	if string(key) == "uri" {
		var ok bool
		e.uri, ok = p.string()
		return ok
	}
	return p.skip()
}

func (e *entry) apiKeyField(p *parser, key []byte) bool {
	var ok bool
	switch string(key) {
	case "id":
		e.keyID, ok = p.string()
	case "plan":
		e.plan, ok = p.string()
	default:
		ok = p.skip()
	}
	return ok
}

// parser reads JSON from b, checking it as encoding/json would (without
// its check of UTF-8, which encoding/json does not make either).
type parser struct {
	b       []byte
	i       int
	depth   int
	scratch []byte // unescaped strings
}

// maxDepth bounds the nesting of arrays and objects, so that a hostile
// line cannot exhaust the stack.
const maxDepth = 1000

func (p *parser) ws() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

// peek returns the next byte, or 0 at the end.
func (p *parser) peek() byte {
	if p.i < len(p.b) {
		return p.b[p.i]
	}
	return 0
}

// fields reads an object at p.i and calls field for each member, with
// p.i at the member's value; field must read the value.
func (p *parser) fields(field func(p *parser, key []byte) bool) bool {
	if p.peek() != '{' {
		return false
	}
	p.depth++
	if p.depth > maxDepth {
		return false
	}
	p.i++
	p.ws()
	if p.peek() == '}' {
		p.i++
		p.depth--
		return true
	}
	for {
		p.ws()
		key, ok := p.string()
		if !ok {
			return false
		}
		p.ws()
		if p.peek() != ':' {
			return false
		}
		p.i++
		p.ws()
		if !field(p, key) {
			return false
		}
		p.ws()
		switch p.peek() {
		case ',':
			p.i++
		case '}':
			p.i++
			p.depth--
			return true
		default:
			return false
		}
	}
}

// skipField skips the value of any member.
func skipField(p *parser, _ []byte) bool { return p.skip() }

// skip skips one value of any type.
func (p *parser) skip() bool {
	switch c := p.peek(); {
	case c == '"':
		return p.skipString()
	case c == '{':
		return p.fields(skipField)
	case c == '[':
		return p.skipArray()
	case c == '-' || c >= '0' && c <= '9':
		_, ok := p.number()
		return ok
	case c == 't':
		return p.literal("true")
	case c == 'f':
		return p.literal("false")
	case c == 'n':
		return p.literal("null")
	}
	return false
}

func (p *parser) skipArray() bool {
	p.depth++
	if p.depth > maxDepth {
		return false
	}
	p.i++
	p.ws()
	if p.peek() == ']' {
		p.i++
		p.depth--
		return true
	}
	for {
		p.ws()
		if !p.skip() {
			return false
		}
		p.ws()
		switch p.peek() {
		case ',':
			p.i++
		case ']':
			p.i++
			p.depth--
			return true
		default:
			return false
		}
	}
}

func (p *parser) literal(lit string) bool {
	if !bytes.HasPrefix(p.b[p.i:], []byte(lit)) {
		return false
	}
	p.i += len(lit)
	return true
}

// null reads a null if there is one.
func (p *parser) null() bool {
	if bytes.HasPrefix(p.b[p.i:], []byte("null")) {
		p.i += 4
		return true
	}
	return false
}

// special marks the bytes that end the fast scan of a string: the quote,
// the backslash and the control characters, which JSON forbids raw.
var special = func() (t [256]bool) {
	for c := range 0x20 {
		t[c] = true
	}
	t['"'], t['\\'] = true, true
	return t
}()

// scanString checks the string at p.i and moves past it. It returns the
// end of its contents (the closing quote) and whether it holds escapes.
func (p *parser) scanString() (end int, escaped, ok bool) {
	if p.peek() != '"' {
		return 0, false, false
	}
	b := p.b
	for i := p.i + 1; i < len(b); i++ {
		// Eight bytes at a time while none of them is special.
		for i+8 <= len(b) && !anySpecial(binary.LittleEndian.Uint64(b[i:])) {
			i += 8
		}
		if i >= len(b) {
			break
		}
		c := b[i]
		if !special[c] {
			continue
		}
		switch c {
		case '"':
			p.i = i + 1
			return i, escaped, true
		case '\\':
			escaped = true
			i++
			if i >= len(b) {
				return 0, false, false
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) {
					return 0, false, false
				}
				for _, h := range b[i+1 : i+5] {
					if !isHex(h) {
						return 0, false, false
					}
				}
				i += 4
			default:
				return 0, false, false
			}
		default:
			return 0, false, false
		}
	}
	return 0, false, false
}

// anySpecial reports whether any of the eight bytes in x is special: a
// quote, a backslash or a control character (the bit tricks of
// https://graphics.stanford.edu/~seander/bithacks.html#HasLessInWord,
// which say exactly whether there is one, not which).
func anySpecial(x uint64) bool {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	less := (x - ones*0x20) &^ x
	quote := x ^ (ones * '"')
	backslash := x ^ (ones * '\\')
	return (less|(quote-ones)&^quote|(backslash-ones)&^backslash)&highs != 0
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func (p *parser) skipString() bool {
	_, _, ok := p.scanString()
	return ok
}

// string reads a string; its value is a slice of the line unless it holds
// escapes.
func (p *parser) string() ([]byte, bool) {
	start := p.i
	end, escaped, ok := p.scanString()
	if !ok {
		return nil, false
	}
	if !escaped {
		return p.b[start+1 : end], true
	}
	return p.unescape(p.b[start+1 : end]), true
}

// unescape decodes the contents of a string that scanString passed, as
// encoding/json would (an unpaired surrogate becomes U+FFFD), into
// p.scratch. The slices it returned before stay as they were.
func (p *parser) unescape(s []byte) []byte {
	start := len(p.scratch)
	out := p.scratch
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '\\' {
			out = append(out, c)
			continue
		}
		i++
		switch s[i] {
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r := rune(hex4(s[i+1:]))
			i += 4
			if utf16.IsSurrogate(r) {
				r2 := unicode.ReplacementChar
				if i+6 < len(s) && s[i+1] == '\\' && s[i+2] == 'u' {
					r2 = rune(hex4(s[i+3:]))
				}
				if dec := utf16.DecodeRune(r, r2); dec != unicode.ReplacementChar {
					r = dec
					i += 6
				} else {
					r = unicode.ReplacementChar
				}
			}
			out = utf8.AppendRune(out, r)
		default: // '"', '\\', '/'
			out = append(out, s[i])
		}
	}
	p.scratch = out
	return out[start:len(out):len(out)]
}

func hex4(h []byte) uint16 {
	var v uint16
	for _, c := range h[:4] {
		switch {
		case c <= '9':
			c -= '0'
		case c <= 'F':
			c -= 'A' - 10
		default:
			c -= 'a' - 10
		}
		v = v<<4 | uint16(c)
	}
	return v
}

// number checks the number at p.i against JSON's grammar and moves past
// it: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (p *parser) number() ([]byte, bool) {
	b, start, i := p.b, p.i, p.i
	digits := func() bool {
		j := i
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
		return i > j
	}
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case !digits():
		return nil, false
	}
	if i < len(b) && b[i] == '.' {
		i++
		if !digits() {
			return nil, false
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if !digits() {
			return nil, false
		}
	}
	p.i = i
	return b[start:i], true
}

// float reads a number.
func (p *parser) float() (float64, bool) {
	num, ok := p.number()
	if !ok {
		return 0, false
	}
	return parseFloat(num), true
}

// pow10 are the exact powers of ten a float64 holds.
var pow10 = [...]float64{1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10,
	1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22}

// parseFloat converts a number that passed number. Plain decimals of up
// to 19 digits, which is what zap writes for ts, duration, status and
// size, are converted here, within an ulp or two (strconv would be exact,
// but needs a string, and so an allocation); the rest by strconv.
func parseFloat(num []byte) float64 {
	var mant uint64
	digits, frac, dot := 0, 0, false
	neg := num[0] == '-'
	i := 0
	if neg {
		i = 1
	}
	for ; i < len(num); i++ {
		c := num[i]
		switch {
		case c >= '0' && c <= '9':
			mant = mant*10 + uint64(c-'0')
			digits++
			if dot {
				frac++
			}
		case c == '.':
			dot = true
		default: // an exponent
			digits = 100
		}
	}
	if digits > 19 || frac >= len(pow10) {
		f, _ := strconv.ParseFloat(string(num), 64) // valid by grammar; ±Inf on overflow
		return f
	}
	f := float64(mant) / pow10[frac]
	if neg {
		f = -f
	}
	return f
}

// timestamp reads ts: a number of unix seconds as Caddy writes it by
// default (or milliseconds, microseconds or nanoseconds, told apart by
// size, for other time_format settings), or an RFC 3339 string. A string
// in another layout is read as no time rather than as a bad line.
func (p *parser) timestamp() (ts float64, has, ok bool) {
	if p.peek() == '"' {
		s, ok := p.string()
		if !ok {
			return 0, false, false
		}
		for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05.000Z0700"} {
			if t, err := time.Parse(layout, string(s)); err == nil {
				return float64(t.UnixNano()) / 1e9, true, true
			}
		}
		return 0, false, true
	}
	ts, ok = p.float()
	switch a := math.Abs(ts); {
	case a >= 1e17:
		ts /= 1e9
	case a >= 1e14:
		ts /= 1e6
	case a >= 1e11:
		ts /= 1e3
	}
	return ts, ok, ok
}

// duration reads duration: seconds as a number, as Caddy writes it by
// default, or a Go duration string (duration_format string).
func (p *parser) duration() (d float64, has, ok bool) {
	if p.peek() == '"' {
		s, ok := p.string()
		if !ok {
			return 0, false, false
		}
		dd, err := time.ParseDuration(string(s))
		if err != nil {
			return 0, false, true
		}
		return dd.Seconds(), true, true
	}
	d, ok = p.float()
	return d, ok, ok
}
