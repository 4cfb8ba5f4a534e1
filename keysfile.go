package apikey

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"maps"
	"math"
	"os"
	"reflect"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/keystile/caddy-apikey/internal/quota"
	"github.com/keystile/caddy-apikey/internal/ratelimit"
	"github.com/keystile/caddy-apikey/internal/regularfile"
)

// keyRecord is one API key as the handler knows it. It holds the key's
// SHA-256 digest, never the key. Everything the request path needs per key
// (the boxed id, the placeholder provider) is made once when the record is
// loaded, so a request for a known key allocates nothing for it.
//
// A server may hold millions of records, so a record holds only what every
// key has, and its rate settings (which records made by hand, in tests, set
// directly); what few keys set (a name, a plan, restrictions...) is in its
// keyRare, whose fields read as the record's own. Keys that set none of it
// share one keyRare, and keys that differ only in plan, quota or disabled
// share one per combination, so a keyRare is never written once made. Nor
// is a record (but for usage): successive versions of a keys file share the
// records of the keys that did not change (reparseKeysFile).
type keyRecord struct {
	id     string
	digest [32]byte

	// limitMode says where the key's rate limit comes from; limit and
	// policy are set when it is limitOwn, burst when the key overrides
	// only the burst of the handler's rate.
	limit     ratelimit.Limit
	policy    policy
	burst     int64
	limitMode limitMode

	*keyRare

	// usage counts the key's requests for the admin API, found on first
	// use (usageOf).
	usage atomic.Pointer[keyUsage]

	// idAny is the id, boxed once: the value of the vars entry and of
	// the id placeholders; provider answers the key's placeholders.
	idAny    any
	provider caddy.ReplacerFunc
}

// keyRare is the part of a keyRecord that most keys leave unset.
type keyRare struct {
	name, owner string
	metadata    map[string]string

	// plan names the key's plan ("" for none); quotaMode and quota, and
	// restr, are the key's own settings, which replace the plan's.
	plan      string
	quotaMode limitMode
	quota     quota.Quota
	restr     restrictions

	// The key's lifecycle: unix nanoseconds, 0 when unset.
	notBefore int64
	expires   int64
	disabled  bool

	// The values of the placeholders, boxed once.
	nameAny, ownerAny, planAny any
	metadataAny                map[string]any
}

type limitMode uint8

const (
	limitInherit limitMode = iota // the handler's rate, if any
	limitOwn                      // the key's own rate
	limitOff                      // exempt from any rate
)

// newKeyRare returns r with its placeholder values made.
func newKeyRare(r *keyRare) *keyRare {
	r.nameAny, r.ownerAny, r.planAny = r.name, r.owner, r.plan
	if len(r.metadata) > 0 {
		r.metadataAny = make(map[string]any, len(r.metadata))
		for k, v := range r.metadata {
			r.metadataAny[k] = v
		}
	}
	return r
}

// noRare is the keyRare of every key that sets none of its fields.
var noRare = newKeyRare(&keyRare{})

// newKeyRecord finishes a record whose fields are set: it makes what the
// request path needs for it.
func newKeyRecord(rec *keyRecord) *keyRecord {
	if rec.keyRare == nil {
		rec.keyRare = noRare
	}
	rec.idAny = boxString(&rec.id)
	rec.provider = rec.replace
	return rec
}

// boxString returns *p as an any without copying it: the interface's data
// word points at *p, which must not change afterwards. Converting a string
// to an any copies its header into a new 16-byte object; every record keeps
// its id boxed, and with a million keys those copies would be a million
// objects and 5 % of the set's memory.
//
// This relies on the runtime's layout of an interface, checked once at
// start-up (boxInPlace); if it ever differs, boxString copies as usual.
func boxString(p *string) any {
	if !boxInPlace {
		return *p
	}
	var v any = "" // string's type word; "" is boxed without allocating
	(*eface)(unsafe.Pointer(&v)).data = unsafe.Pointer(p)
	return v
}

// eface mirrors the runtime's layout of an interface without methods.
type eface struct {
	typ, data unsafe.Pointer
}

// boxInPlace reports whether an any is laid out as eface, holding a
// string as a pointer to it.
var boxInPlace = func() bool {
	if unsafe.Sizeof(any(nil)) != unsafe.Sizeof(eface{}) {
		return false
	}
	s := "probe"
	var v, empty any = s, ""
	e := (*eface)(unsafe.Pointer(&v))
	return e.typ == (*eface)(unsafe.Pointer(&empty)).typ && e.data != nil && *(*string)(e.data) == s
}()

// replace answers the placeholders of a request made with this key.
func (rec *keyRecord) replace(key string) (any, bool) {
	name, ok := strings.CutPrefix(key, "http.api_key.")
	if !ok {
		if key == "http.auth.user.id" {
			return rec.idAny, true
		}
		return nil, false
	}
	switch name {
	case "id":
		return rec.idAny, true
	case "name":
		return rec.nameAny, true
	case "owner":
		return rec.ownerAny, true
	case "plan":
		return rec.planAny, true
	case "restriction":
		// Set as a static value when one fails; empty otherwise.
		return "", true
	case "outcome":
		return outcomeOK, true
	}
	if field, ok := strings.CutPrefix(name, "metadata."); ok {
		// Like a missing request header, a field the key lacks is empty.
		if v, ok := rec.metadataAny[field]; ok {
			return v, true
		}
		return "", true
	}
	return nil, false
}

// keySet is an immutable set of keys, looked up by digest. A new set gets a
// new generation, which is how cached lookups from an older set are told
// apart and ignored.
type keySet struct {
	byDigest digestIndex
	gen      uint64
}

var setGeneration atomic.Uint64

func newKeySet(n int) *keySet {
	return &keySet{byDigest: newDigestIndex(n), gen: setGeneration.Add(1)}
}

// get returns the key with digest d, nil if the set has none.
func (s *keySet) get(d *[32]byte) *keyRecord { return s.byDigest.get(d) }

// len is the number of keys in the set.
func (s *keySet) len() int { return s.byDigest.len() }

// all yields every key of the set with its digest, in no particular order.
func (s *keySet) all() iter.Seq2[[32]byte, *keyRecord] { return s.byDigest.all() }

// keyFileEntry is one entry of a keys file as it is written.
type keyFileEntry struct {
	ID        string            `json:"id"`
	Hash      string            `json:"hash"`
	Name      string            `json:"name,omitempty"`
	Owner     string            `json:"owner,omitempty"`
	Plan      string            `json:"plan,omitempty"`
	Rate      string            `json:"rate,omitempty"`
	Burst     *int64            `json:"burst,omitempty"`
	Quota     string            `json:"quota,omitempty"`
	NotBefore string            `json:"not_before,omitempty"`
	Expires   string            `json:"expires,omitempty"`
	Disabled  bool              `json:"disabled,omitempty"`
	Metadata  map[string]string `json:"metadata,omitempty"`
	Restrictions
}

// parseKeysFile reads a keys file: {"keys": [entry, ...]}. It names the
// entry and the problem in any error (never a key: files hold only hashes).
//
// A file of a million keys is common, so scanKeysFile reads it first, fast;
// decodeKeysFile, with encoding/json, reads what scanKeysFile does not take,
// and finds the error of a file that has one. The two make the same
// records of a file that both read.
func parseKeysFile(data []byte) (*keySet, error) {
	set, _, _, err := reparseKeysFile(data, nil)
	return set, err
}

// reparseKeysFile is parseKeysFile for a new version of a file whose
// previous version made old (nil for none). The records of the keys that
// did not change are old's, and it counts the keys added and removed.
func reparseKeysFile(data []byte, old *keySet) (set *keySet, added, removed int, err error) {
	a := &recordAlloc{old: old}
	if set = scanKeysFile(data, a); set == nil {
		a = &recordAlloc{old: old}
		if set, err = decodeKeysFile(data, a); err != nil {
			return nil, 0, 0, err
		}
	}
	if old != nil {
		added, removed = set.len()-a.kept, old.len()-a.kept
	}
	return set, added, removed, nil
}

// decodeKeysFile is parseKeysFile with encoding/json, making its records
// with a. It streams the entries so that a large file is not held twice.
func decodeKeysFile(data []byte, a *recordAlloc) (*keySet, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	syntaxErr := func(err error) error {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return errors.New("unexpected end of file (truncated JSON?)")
		}
		// The streaming decoder's offsets do not count from the start
		// of the file; decoding the whole file again finds the place.
		var se *json.SyntaxError
		var ute *json.UnmarshalTypeError
		whole := json.Unmarshal(data, &struct {
			Keys []keyFileEntry `json:"keys"`
		}{})
		switch {
		case errors.As(whole, &se):
			line, col := lineCol(data, se.Offset)
			return fmt.Errorf("invalid JSON at line %d, column %d: %v", line, col, se)
		case errors.As(whole, &ute):
			line, col := lineCol(data, ute.Offset)
			return fmt.Errorf("line %d, column %d: %s must be %s, not a JSON %s", line, col, fieldName(ute), typeName(ute.Type), ute.Value)
		}
		return err
	}
	expectDelim := func(want json.Delim, what string) error {
		tok, err := dec.Token()
		if err != nil {
			return syntaxErr(err)
		}
		if d, ok := tok.(json.Delim); !ok || d != want {
			return fmt.Errorf("expected %s, found %s", what, tokenText(tok))
		}
		return nil
	}

	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errors.New(`file is empty; want {"keys": [...]}`)
	}
	if err := expectDelim('{', `a JSON object {"keys": [...]}`); err != nil {
		return nil, err
	}
	var set *keySet
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, syntaxErr(err)
		}
		if tok != "keys" {
			return nil, fmt.Errorf(`unknown top-level field %q; want {"keys": [...]}`, tok)
		}
		if set != nil {
			return nil, errors.New(`"keys" appears twice`)
		}
		if err := expectDelim('[', `an array after "keys"`); err != nil {
			return nil, err
		}
		set = newKeySet(0)
		byID := make(map[string]int)
		var raw json.RawMessage // reused: decoding into it appends
		for i := 0; dec.More(); i++ {
			if err := dec.Decode(&raw); err != nil {
				return nil, fmt.Errorf("keys[%d]: %w", i, syntaxErr(err))
			}
			var e keyFileEntry
			if err := decodeEntryJSON(raw, &e); err != nil {
				if _, repeated := errors.AsType[*repeatedFieldError](err); !repeated {
					err = syntaxErr(err)
				}
				return nil, fmt.Errorf("keys[%d]%s: %w", i, idLabel(e.ID), err)
			}
			rec, err := e.build(a)
			if err != nil {
				return nil, fmt.Errorf("keys[%d]%s: %w", i, idLabel(e.ID), err)
			}
			if j, dup := byID[rec.id]; dup {
				return nil, fmt.Errorf("keys[%d]%s: duplicate id (also keys[%d])", i, idLabel(e.ID), j)
			}
			if other := set.byDigest.add(rec); other != nil {
				return nil, fmt.Errorf("keys[%d]%s: duplicate hash (same as keys[%d], id %q)", i, idLabel(e.ID), byID[other.id], other.id)
			}
			byID[rec.id] = i
		}
		if err := expectDelim(']', `"]" closing "keys"`); err != nil {
			return nil, err
		}
	}
	if err := expectDelim('}', `"}" closing the file`); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("unexpected data after the closing }")
	}
	if set == nil {
		return nil, errors.New(`no "keys" array; want {"keys": [...]}`)
	}
	return set, nil
}

// decodeEntryJSON decodes one entry of a keys file, raw, into e with
// encoding/json, as the server reads it: a field that keyFileEntry does not
// have is an error, and so is a field that appears twice (checkRepeated).
// raw must be the entry and nothing more. On an error e holds what could
// be read, for the error's label.
func decodeEntryJSON(raw []byte, e *keyFileEntry) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(e); err != nil {
		return err
	}
	if dec.InputOffset() != int64(len(raw)) {
		return errors.New("unexpected data after the entry")
	}
	return checkRepeated(raw)
}

// repeatedFieldError is the error of an entry that has a field twice:
// name, in parent's object (metadata) if parent is not "". as holds the
// two spellings of an entry's own field when they differ from its name.
type repeatedFieldError struct {
	parent, name string
	as           [2]string
}

func (e *repeatedFieldError) Error() string {
	switch {
	case e.parent != "":
		return fmt.Sprintf("%s field %q appears twice", e.parent, e.name)
	case e.as[0] != e.name || e.as[1] != e.name:
		return fmt.Sprintf("%q appears twice (as %q and %q)", e.name, e.as[0], e.as[1])
	}
	return fmt.Sprintf("%q appears twice", e.name)
}

// checkRepeated returns a *repeatedFieldError if a name appears twice in
// the entry obj, valid JSON: among the entry's own fields, whose names
// encoding/json matches in any case ("Disabled" is "disabled"), or in an
// object within it (metadata), whose names it matches exactly. Of a name
// twice encoding/json keeps the last value without a word, and then
// {"disabled": true, ..., "disabled": false} serves a key that whoever
// reads the first one thinks is off. It must run after the entry decoded
// without error, which is what makes obj an object of keyFileEntry's
// fields, with no object deeper than metadata's.
func checkRepeated(obj []byte) error {
	fields := entryFields()
	var seen [32]string // the spelling of each field seen, by its index
	w := jsonWalk{b: obj}
	if !w.open('{') {
		return nil
	}
	for w.member() {
		name := w.name()
		field := name
		if k := fieldIndex(fields, name); k >= 0 {
			field = fields[k]
			if seen[k] != "" {
				return &repeatedFieldError{name: field, as: [2]string{seen[k], name}}
			}
			seen[k] = name
		}
		w.colon()
		if !w.open('{') {
			w.skipValue()
			continue
		}
		var names map[string]bool
		for w.member() {
			name := w.name()
			if names[name] {
				return &repeatedFieldError{parent: field, name: name}
			}
			if names == nil {
				names = make(map[string]bool)
			}
			names[name] = true
			w.colon()
			w.skipValue()
		}
	}
	return nil
}

// entryFields are the JSON names of keyFileEntry's fields, Restrictions'
// included, in order; at most 32 (checkRepeated's array).
var entryFields = sync.OnceValue(func() []string {
	var names []string
	var add func(t reflect.Type)
	add = func(t reflect.Type) {
		for f := range t.Fields() {
			if f.Anonymous {
				add(f.Type)
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			names = append(names, name)
		}
	}
	add(reflect.TypeFor[keyFileEntry]())
	if len(names) > 32 {
		panic("keyFileEntry has more than 32 fields")
	}
	return names
})

// fieldIndex returns the index of name in fields, matched as encoding/json
// matches a field's name (exactly, else in any case), or -1.
func fieldIndex(fields []string, name string) int {
	if k := slices.Index(fields, name); k >= 0 {
		return k
	}
	return slices.IndexFunc(fields, func(f string) bool { return strings.EqualFold(f, name) })
}

// jsonWalk steps through the members of objects in b, valid JSON, without
// decoding their values. Should b not be valid, it stops, never panics.
type jsonWalk struct {
	b []byte
	i int
}

func (w *jsonWalk) space() {
	for w.i < len(w.b) && (w.b[w.i] == ' ' || w.b[w.i] == '\t' || w.b[w.i] == '\n' || w.b[w.i] == '\r') {
		w.i++
	}
}

// open steps past c (an object's '{') if it comes next.
func (w *jsonWalk) open(c byte) bool {
	w.space()
	if w.i < len(w.b) && w.b[w.i] == c {
		w.i++
		return true
	}
	return false
}

// member steps to the name of the object's next member and reports
// whether there is one; past the object's '}' if not.
func (w *jsonWalk) member() bool {
	w.space()
	if w.i < len(w.b) && w.b[w.i] == ',' {
		w.i++
		w.space()
	}
	if w.i < len(w.b) && w.b[w.i] == '"' {
		return true
	}
	w.i++ // the '}'
	return false
}

// name reads a member's name as encoding/json reads it: unescaped, with
// invalid UTF-8 replaced.
func (w *jsonWalk) name() string {
	start := w.i
	w.skipString()
	quoted := w.b[start:w.i]
	plain := true
	for _, c := range quoted {
		if c == '\\' || c >= utf8.RuneSelf {
			plain = false
			break
		}
	}
	if plain && len(quoted) >= 2 {
		return string(quoted[1 : len(quoted)-1])
	}
	var s string
	_ = json.Unmarshal(quoted, &s)
	return s
}

func (w *jsonWalk) colon() {
	w.space()
	if w.i < len(w.b) && w.b[w.i] == ':' {
		w.i++
	}
	w.space()
}

func (w *jsonWalk) skipString() {
	for w.i++; w.i < len(w.b); w.i++ {
		switch w.b[w.i] {
		case '\\':
			w.i++
		case '"':
			w.i++
			return
		}
	}
	w.i = len(w.b) // a backslash at the very end stepped past it
}

// skipValue steps past the value that starts at w.i.
func (w *jsonWalk) skipValue() {
	depth := 0
	for w.i < len(w.b) {
		switch w.b[w.i] {
		case '"':
			w.skipString()
			if depth == 0 {
				return
			}
			continue
		case '{', '[':
			depth++
		case '}', ']':
			if depth == 0 {
				return // the end of the enclosing object
			}
			if depth--; depth == 0 {
				w.i++
				return
			}
		case ',':
			if depth == 0 {
				return
			}
		}
		w.i++
	}
}

// tokenText shows a JSON token in an error: strings quoted, so that no
// control character reaches a log line as it is.
func tokenText(tok json.Token) string {
	if str, ok := tok.(string); ok {
		return fmt.Sprintf("%q", str)
	}
	return fmt.Sprint(tok)
}

func idLabel(id string) string {
	if id == "" {
		return ""
	}
	return fmt.Sprintf(" (id %q)", id)
}

// typeName says in JSON's words what a Go type wants.
func typeName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Int64, reflect.Int:
		return "a whole number"
	case reflect.String:
		return "a string"
	case reflect.Map, reflect.Struct:
		return "an object"
	case reflect.Slice:
		return "an array"
	}
	return "a " + t.String()
}

func fieldName(ute *json.UnmarshalTypeError) string {
	field := strings.TrimPrefix(ute.Field, "keys.")
	if field == "" || field == "keys" {
		return "value"
	}
	return fmt.Sprintf("%q", field)
}

func lineCol(data []byte, offset int64) (line, col int) {
	if offset > int64(len(data)) {
		offset = int64(len(data))
	}
	before := data[:offset]
	line = bytes.Count(before, []byte{'\n'}) + 1
	col = int(offset) - (bytes.LastIndexByte(before, '\n') + 1)
	return line, col
}

// record checks one entry and turns it into a keyRecord.
func (e keyFileEntry) record() (*keyRecord, error) {
	return e.build(nil)
}

// recordAlloc is what the records of one keys file share: the keyRare of
// the keys that set nothing but a plan, a quota or disabled, each rate read
// once, plan names, and the records of the file's previous version. The
// zero value is ready; a nil one shares nothing.
type recordAlloc struct {
	rares map[rareKey]*keyRare
	rates map[string]rateSetting
	strs  map[string]string // interned plan names

	// old is the set of the file's previous version, if any: a record
	// that did not change is taken from there. kept counts the digests
	// found in it.
	old  *keySet
	kept int
}

// rareKey is the content of a keyRare that keys may share.
type rareKey struct {
	plan      string
	quotaMode limitMode
	quota     quota.Quota
	disabled  bool
}

type rateSetting struct {
	lim ratelimit.Limit
	pol policy
}

// build checks one entry and turns it into a keyRecord. The record keeps
// e's strings but Hash, Rate, Quota, NotBefore and Expires, which it only
// reads: those may be views of a buffer that changes later.
func (e *keyFileEntry) build(a *recordAlloc) (*keyRecord, error) {
	if err := checkID(e.ID); err != nil {
		return nil, err
	}
	if e.Hash == "" {
		return nil, errors.New(`missing "hash" (sha256:<64 hex digits>)`)
	}
	digest, err := parseDigest(e.Hash)
	if err != nil {
		return nil, err
	}
	// The record is made last, when it is known that no record of the
	// previous version of the file will do.
	rec := keyRecord{id: e.ID, digest: digest}
	if e.Plan != "" {
		if err := checkPlanName(e.Plan); err != nil {
			return nil, fmt.Errorf(`"plan": %w`, err)
		}
	}
	notBefore, err := parseTime("not_before", e.NotBefore)
	if err != nil {
		return nil, err
	}
	expires, err := parseTime("expires", e.Expires)
	if err != nil {
		return nil, err
	}
	if notBefore != 0 && expires != 0 && expires <= notBefore {
		return nil, errors.New(`"expires" is not after "not_before"`)
	}
	quotaMode, q, err := parseQuotaSetting(e.Quota)
	if err != nil {
		return nil, fmt.Errorf(`"quota": %w`, err)
	}
	var restr restrictions
	if r := &e.Restrictions; r.AllowIPs != nil || r.AllowReferrers != nil || r.AllowMethods != nil || r.AllowPaths != nil {
		if restr, err = compileRestrictions(e.Restrictions); err != nil {
			return nil, err
		}
	}
	for k := range e.Metadata {
		if !validMetadataName(k) {
			return nil, fmt.Errorf("metadata field %q: use letters, digits, '_', '-' and '.' only", k)
		}
	}
	if e.Burst != nil {
		if e.Rate == "off" {
			return nil, errors.New(`"burst" makes no sense with "rate": "off"`)
		}
		if err := ratelimit.ValidateBurst(*e.Burst); err != nil {
			return nil, fmt.Errorf(`"burst": %w`, err)
		}
	}
	switch e.Rate {
	case "":
		if e.Burst != nil {
			rec.burst = *e.Burst
		}
	case "off":
		rec.limitMode = limitOff
	default:
		rs, err := a.rate(e.Rate)
		if err != nil {
			return nil, fmt.Errorf(`"rate": %w`, err)
		}
		if e.Burst != nil {
			rs.lim.Burst = *e.Burst
		}
		rec.limitMode = limitOwn
		rec.limit = rs.lim
		rec.policy = rs.pol
	}
	shared := rareKey{plan: e.Plan, quotaMode: quotaMode, quota: q, disabled: e.Disabled}
	if e.Name == "" && e.Owner == "" && len(e.Metadata) == 0 && restr.isZero() && notBefore == 0 && expires == 0 {
		rec.keyRare = a.rare(shared)
	} else {
		r := &keyRare{
			name: e.Name, owner: e.Owner, plan: e.Plan, quotaMode: quotaMode, quota: q, restr: restr,
			notBefore: notBefore, expires: expires, disabled: e.Disabled,
		}
		if len(e.Metadata) > 0 {
			r.metadata = e.Metadata
		}
		rec.keyRare = newKeyRare(r)
	}
	if old := a.previous(&rec); old != nil {
		return old, nil
	}
	return newKeyRecord(&keyRecord{
		id: rec.id, digest: rec.digest, limit: rec.limit, policy: rec.policy, burst: rec.burst,
		limitMode: rec.limitMode, keyRare: rec.keyRare,
	}), nil
}

// previous returns the record of the previous version of the file with
// rec's digest if it is the same as rec, and counts the digests found
// there. Reusing the record leaves a reload of a large file little
// garbage, and the key's usage counts where they were.
func (a *recordAlloc) previous(rec *keyRecord) *keyRecord {
	if a == nil || a.old == nil {
		return nil
	}
	old := a.old.get(&rec.digest)
	if old == nil {
		return nil
	}
	a.kept++
	if old.id != rec.id || old.limitMode != rec.limitMode || old.limit != rec.limit || old.policy != rec.policy ||
		old.burst != rec.burst || !old.keyRare.equal(rec.keyRare) {
		return nil
	}
	return old
}

// equal reports whether r and o hold the same settings.
func (r *keyRare) equal(o *keyRare) bool {
	if r == o {
		return true
	}
	return r.name == o.name && r.owner == o.owner && r.plan == o.plan && r.quotaMode == o.quotaMode &&
		r.quota == o.quota && r.notBefore == o.notBefore && r.expires == o.expires && r.disabled == o.disabled &&
		maps.Equal(r.metadata, o.metadata) && slices.Equal(r.restr.ips, o.restr.ips) &&
		slices.Equal(r.restr.referrers, o.restr.referrers) && slices.Equal(r.restr.methods, o.restr.methods) &&
		slices.Equal(r.restr.paths, o.restr.paths)
}

// rate reads a rate setting, once per file.
func (a *recordAlloc) rate(s string) (rateSetting, error) {
	if a != nil {
		if rs, ok := a.rates[s]; ok {
			return rs, nil
		}
	}
	lim, err := ratelimit.ParseRate(s)
	if err != nil {
		return rateSetting{}, err
	}
	rs := rateSetting{lim: lim, pol: policyValue("key", lim)}
	if a != nil {
		if a.rates == nil {
			a.rates = make(map[string]rateSetting)
		}
		a.rates[strings.Clone(s)] = rs
	}
	return rs, nil
}

// rare returns the keyRare of a key that sets no more than k: noRare, or
// one shared with the file's other keys that set the same.
func (a *recordAlloc) rare(k rareKey) *keyRare {
	if k == (rareKey{}) {
		return noRare
	}
	if a != nil && a.rares[k] != nil {
		return a.rares[k]
	}
	r := newKeyRare(&keyRare{plan: k.plan, quotaMode: k.quotaMode, quota: k.quota, disabled: k.disabled})
	if a != nil {
		if a.rares == nil {
			a.rares = make(map[rareKey]*keyRare)
		}
		a.rares[k] = r
	}
	return r
}

// parseTime reads an RFC 3339 time of a keys-file field; 0 when unset.
func parseTime(field, s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return 0, fmt.Errorf("%q: %q is not an RFC 3339 time such as 2027-01-31T00:00:00Z", field, s)
	}
	// Nanoseconds since 1970 cover the years 1678 to 2262 only; times
	// beyond are clamped, so that "9999-12-31T23:59:59Z" means never and
	// a date long past is past (UnixNano would wrap them around).
	switch {
	case t.After(maxRecordTime):
		return math.MaxInt64, nil
	case !t.After(minRecordTime):
		return 1, nil // 0 means unset
	}
	return t.UnixNano(), nil
}

var (
	minRecordTime = time.Unix(0, 1)
	maxRecordTime = time.Unix(0, math.MaxInt64-1)
)

// checkID accepts ids that are safe to print in logs, headers and metric
// labels: 1 to 128 visible ASCII characters other than quotes and backslash.
func checkID(id string) error {
	if id == "" {
		return errors.New(`missing "id"`)
	}
	if len(id) > 128 {
		return errors.New(`"id" is longer than 128 characters`)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return fmt.Errorf(`"id" %q: use visible ASCII characters other than quotes and backslash`, id)
		}
	}
	return nil
}

func validMetadataName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

const digestPrefix = "sha256:"

// parseDigest reads "sha256:<64 hex digits>". Its errors quote nothing of
// the value past the prefix, in case someone pasted a key there.
func parseDigest(s string) ([32]byte, error) {
	var d [32]byte
	if !hasDigestPrefix(s) {
		return d, errors.New(`"hash" must start with "sha256:"`)
	}
	hexPart := s[len(digestPrefix):]
	if len(hexPart) != 64 {
		return d, fmt.Errorf(`"hash" must be "sha256:" and 64 hex digits, not %d characters`, len(hexPart))
	}
	for i := range d {
		hi, lo := unhex[hexPart[2*i]], unhex[hexPart[2*i+1]]
		if hi|lo > 0xf {
			return [32]byte{}, errors.New(`"hash" has a character that is not a hex digit`)
		}
		d[i] = hi<<4 | lo
	}
	return d, nil
}

// unhex is the value of each hex digit, 0xff for other bytes.
var unhex = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for i, c := range "0123456789abcdef" {
		t[c] = byte(i)
	}
	for i, c := range "ABCDEF" {
		t[c] = byte(10 + i)
	}
	return t
}()

// hasDigestPrefix reports whether s starts with "sha256:", in any case.
func hasDigestPrefix(s string) bool {
	return len(s) >= len(digestPrefix) && strings.EqualFold(s[:len(digestPrefix)], digestPrefix)
}

// isDigest reports whether s has the form of a digest rather than a key.
func isDigest(s string) bool {
	_, err := parseDigest(s)
	return err == nil
}

// hashKey returns the "sha256:<hex>" form of a plaintext key.
func hashKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	return digestPrefix + hex.EncodeToString(sum[:])
}

// keysFilePollInterval is how often a keys file is checked for changes.
// The documented bound from write to effect is 5 s; one poll plus a read
// stays well within it.
var keysFilePollInterval = time.Second

// largeKeySet is the size from which loading a keys file hands the
// memory the load left behind back to the operating system (see
// releaseLoadGarbage).
var largeKeySet = 100_000

// freeOSMemory is debug.FreeOSMemory; a test counts its calls.
var freeOSMemory = debug.FreeOSMemory

// releasing is set while a release runs; pending is set by a load that
// wants one, and cleared by the release that starts after it. Loads in
// quick succession so share releases, and none goes without one that
// starts after it.
var releasing, releasePending atomic.Bool

// releaseLoadGarbage returns the memory a load of n keys left behind to
// the operating system, in the background, when n is large. A load reads
// the whole file (about 100 bytes a key) and makes the set; the file's
// bytes, and after a reload the old set's index and changed records, are
// garbage then. With Go's default GOGC the runtime keeps such memory
// resident as room for the heap to grow into, so a process that loaded
// a million keys would hold about 120 bytes a key more than it uses until
// the heap needed it. The release is a collection and a scavenge: what a
// collection soon after a load does anyway, plus the scavenge.
//
// An operator who set a memory limit (the GOMEMLIMIT variable, other than
// "off") has left memory to the runtime: then nothing is done. (The limit
// itself cannot tell: Caddy sets one at start-up from the cgroup's or the
// machine's memory unless the variable is set.)
func releaseLoadGarbage(n int) {
	if n < largeKeySet {
		return
	}
	if v := os.Getenv("GOMEMLIMIT"); v != "" && v != "off" {
		return
	}
	releasePending.Store(true)
	if !releasing.CompareAndSwap(false, true) {
		return // the release running sees pending when it ends
	}
	go func() {
		for {
			for releasePending.Swap(false) {
				freeOSMemory()
			}
			releasing.Store(false)
			// A load may have set pending after the last Swap and
			// found releasing still set: then this goes on.
			if !releasePending.Load() || !releasing.CompareAndSwap(false, true) {
				return
			}
		}
	}()
}

// keysFile is a watched keys file, shared through a caddy.UsagePool by
// every handler that names it, so that its keys and its watcher outlive
// config reloads and a large file is parsed once.
type keysFile struct {
	path   string
	logger atomic.Pointer[zap.Logger] // the newest config's
	set    atomic.Pointer[keySet]

	// check's state, under mu: the watcher and config reloads both call
	// it. sum is the digest of the bytes last read, err what parsing
	// them said (nil when they are the keys in use); usedSum is the
	// digest of the bytes of the keys in use.
	mu      sync.Mutex
	stamp   fileStamp
	sum     [32]byte
	err     error
	usedSum [32]byte
	// added and removed count the keys the last load added to the set
	// before it and removed from it.
	added, removed int

	// checks are what each handler that uses the file requires of a key
	// set (that the plans its keys name exist there), under mu. A config
	// whose handler fails its check on the keys in use does not load; a
	// new version of the file that fails one is loaded all the same (so
	// that a typo in one key's plan cannot hold back every later edit,
	// revocations included), the failure is logged, and that handler
	// refuses the keys on plans it does not define.
	checks map[*Handler]func(*keySet) error

	stop    chan struct{}
	stopped sync.WaitGroup
}

// fileStamp tells whether a file may have changed without reading it.
// Its ctime is set by the kernel on every write, rename and utimes, so
// tools that restore an old mtime (cp -p, rsync -t, tar) are seen too.
type fileStamp struct {
	mod   time.Time
	ctime time.Time
	size  int64
	inode uint64
	dev   uint64
}

func statFile(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	st := fileStamp{mod: fi.ModTime(), size: fi.Size()}
	st.inode, st.dev, st.ctime = fileIdentity(fi)
	return st, nil
}

// loadKeysFile reads and parses path once; the error names the file.
func loadKeysFile(path string) (*keySet, fileStamp, [32]byte, error) {
	data, stamp, err := readKeysFile(path)
	if err != nil {
		return nil, stamp, [32]byte{}, err
	}
	set, err := parseKeysFile(data)
	if err != nil {
		return nil, stamp, [32]byte{}, fmt.Errorf("loading keys file %s: %w", path, err)
	}
	return set, stamp, sha256.Sum256(data), nil
}

// recentWrite is how new a file's change time must be for a second write
// to share it: file systems count time in ticks, some coarse.
var recentWrite = 2 * time.Second

// readKeysFile reads path and returns its stamp, the zero stamp when the
// file changed so recently that another write could leave the stamp
// unchanged: then the next check reads the content again (and parses it
// only if it differs from what was read before).
func readKeysFile(path string) ([]byte, fileStamp, error) {
	stamp, err := statFile(path)
	if err != nil {
		return nil, stamp, fmt.Errorf("loading keys file %s: %w", path, err)
	}
	// Not os.ReadFile: a named pipe put at path would block it, for
	// ever, and with it kf.mu, config reloads and the admin API.
	data, _, err := regularfile.ReadFile(path)
	if err != nil {
		return nil, stamp, fmt.Errorf("loading keys file %s: %w", path, err)
	}
	if changed := stamp.ctime; changed.IsZero() || time.Since(changed) < recentWrite {
		stamp = fileStamp{}
	}
	return data, stamp, nil
}

func openKeysFile(path string, logger *zap.Logger) (*keysFile, error) {
	set, stamp, sum, err := loadKeysFile(path)
	if err != nil {
		return nil, err
	}
	kf := &keysFile{path: path, stamp: stamp, sum: sum, usedSum: sum, stop: make(chan struct{}),
		checks: make(map[*Handler]func(*keySet) error)}
	kf.logger.Store(logger)
	kf.set.Store(set)
	logger.Info("keys file loaded", zap.String("file", path), zap.Int("keys", set.len()))
	apiKeyMetrics.once.Do(initMetrics)
	apiKeyMetrics.keysLoaded.WithLabelValues(path).Set(float64(set.len()))
	releaseLoadGarbage(set.len())
	kf.stopped.Add(1)
	go kf.watch()
	return kf, nil
}

func (kf *keysFile) watch() {
	defer kf.stopped.Done()
	t := time.NewTicker(keysFilePollInterval)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-kf.stop:
			return
		case <-t.C:
		}
		if err := kf.check(); err != nil {
			// Log each distinct problem once, not on every poll.
			if msg := err.Error(); msg != lastErr {
				lastErr = msg
				kf.logger.Load().Error("keys file not reloaded; the previous keys stay in use",
					zap.String("file", kf.path), zap.Error(err))
			}
		} else {
			lastErr = ""
		}
	}
}

// check reloads the file if it changed. A file that is missing or broken
// leaves the current keys in place and returns the reason.
func (kf *keysFile) check() error {
	kf.mu.Lock()
	defer kf.mu.Unlock()
	return kf.checkLocked()
}

// checkLocked is check with kf.mu held.
func (kf *keysFile) checkLocked() error {
	stamp, err := statFile(kf.path)
	if err != nil {
		return fmt.Errorf("keys file %s: %w", kf.path, err)
	}
	if stamp == kf.stamp {
		return kf.err
	}
	data, stamp, err := readKeysFile(kf.path)
	if err != nil {
		return err
	}
	kf.stamp = stamp
	sum := sha256.Sum256(data)
	if sum == kf.sum {
		// The same bytes as last time: the same keys, or the same error.
		return kf.err
	}
	kf.sum = sum
	if sum == kf.usedSum {
		// Back to the keys in use, after a broken version.
		kf.err = nil
		return nil
	}
	// kf.set changes only here, under mu.
	set, added, removed, err := reparseKeysFile(data, kf.set.Load())
	if err != nil {
		apiKeyMetrics.reloadErrors.WithLabelValues(kf.path).Inc()
		kf.err = fmt.Errorf("loading keys file %s: %w", kf.path, err)
		return kf.err
	}
	kf.err, kf.usedSum = nil, sum
	kf.added, kf.removed = added, removed
	kf.set.Store(set)
	apiKeyMetrics.keysLoaded.WithLabelValues(kf.path).Set(float64(set.len()))
	releaseLoadGarbage(set.len())
	if c := kf.logger.Load().Check(zapcore.InfoLevel, "keys file reloaded"); c != nil {
		c.Write(zap.String("file", kf.path), zap.Int("keys", set.len()),
			zap.Int("added", added), zap.Int("removed", removed))
	}
	for _, check := range kf.checks {
		if err := check(set); err != nil {
			kf.logger.Load().Error("keys file loaded, but a site refuses some of its keys; define their plans in its api_key",
				zap.String("file", kf.path), zap.Error(err))
		}
	}
	return nil
}

// addCheck runs check on the keys in use and, if they pass, keeps it for
// every later version of the file, until removeCheck.
func (kf *keysFile) addCheck(h *Handler, check func(*keySet) error) error {
	kf.mu.Lock()
	defer kf.mu.Unlock()
	if err := check(kf.set.Load()); err != nil {
		return fmt.Errorf("keys file %s: %w", kf.path, err)
	}
	kf.checks[h] = check
	return nil
}

// removeCheck drops h's check.
func (kf *keysFile) removeCheck(h *Handler) {
	kf.mu.Lock()
	defer kf.mu.Unlock()
	delete(kf.checks, h)
}

// reloadResult is what reloadNow found.
type reloadResult struct {
	keys, added, removed int
	changed              bool
}

// reloadNow reads the file now, whatever its stamp says, and loads it if
// it changed and is valid.
//
// It holds kf.mu throughout, so the watcher cannot load a version in
// between, and the counts are those of this load. It keeps only the old
// set's generation, not the set: the release of memory after a large load
// (releaseLoadGarbage, in the background) can then free the old set.
func (kf *keysFile) reloadNow() (reloadResult, error) {
	kf.mu.Lock()
	defer kf.mu.Unlock()
	before := kf.set.Load().gen
	kf.stamp, kf.sum = fileStamp{}, [32]byte{}
	err := kf.checkLocked()
	after := kf.set.Load()
	res := reloadResult{keys: after.len(), changed: after.gen != before}
	if res.changed {
		res.added, res.removed = kf.added, kf.removed
	}
	return res, err
}

// Destruct stops the watcher once no handler uses the file any more.
func (kf *keysFile) Destruct() error {
	close(kf.stop)
	kf.stopped.Wait()
	apiKeyMetrics.keysLoaded.DeleteLabelValues(kf.path)
	return nil
}

var _ caddy.Destructor = (*keysFile)(nil)
