// Package keysedit edits a keys file ({"keys": [entry, ...]}) for the
// api-key command while a running Caddy may be polling the same file.
//
// A running server reloads the file within a second of a change, so a
// reader must never see half a file: Save writes a temporary file next to
// the real one and renames it into place. An operator may also edit the
// file by hand while a command runs, so Save refuses to overwrite bytes it
// did not read. And an operator's file is theirs: every entry an edit is
// not about is written back byte for byte, and the one it is about keeps
// its members' order and spacing.
//
// The package checks only what it needs to edit by id (that each entry is
// an object with a unique, non-empty string "id", and no member twice);
// the server's parser remains the judge of everything else.
package keysedit

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"unicode"

	"github.com/keystile/caddy-apikey/internal/regularfile"
)

// ErrNotFound is wrapped by the error of Set and Remove for an id the file
// does not have, so that a command can tell "no such key" from a failure.
var ErrNotFound = errors.New("no such key")

// ErrChanged is wrapped by the error of Save when the file on disk is no
// longer what Load read: writing would silently undo someone else's edit.
var ErrChanged = errors.New("the file changed since it was read; run the command again")

// newFileMode is the mode of a keys file that Save creates. The file holds
// only hashes, but its ids and limits are still nobody else's business.
const newFileMode os.FileMode = 0o600

// rename is os.Rename, a variable so that tests can make the last step of
// Save fail, which they cannot do with permissions when run as root.
var rename = os.Rename

// File is a keys file read for editing. Entries are kept as their raw
// JSON, so an edit changes only the entry it is about. A File is not safe
// for concurrent use.
type File struct {
	path   string // as the caller named it, for messages
	target string // path with symlinks resolved: the file that is edited

	// What Load read, for Save's lost-update guard: existed is false when
	// LoadOrNew found no file, and sum is the SHA-256 of the bytes read.
	existed bool
	sum     [32]byte

	entries []entry
}

// entry is one element of the "keys" array: its bytes, and the two
// members the editor needs to know about.
type entry struct {
	raw  json.RawMessage
	id   string
	hash string // "" when absent or not a string
}

// Load reads the keys file at path for editing. A missing file is an
// error; use LoadOrNew to start one.
func Load(path string) (*File, error) {
	return load(path, false)
}

// LoadOrNew is Load, except that a missing file reads as {"keys": []} and
// Save creates it (mode 0600), as long as nobody else has by then.
func LoadOrNew(path string) (*File, error) {
	return load(path, true)
}

func load(path string, orNew bool) (*File, error) {
	f := &File{path: path, target: path}
	target, err := filepath.EvalSymlinks(path)
	switch {
	case err == nil:
		f.target = target
	case errors.Is(err, os.ErrNotExist) && orNew:
		// Creating the file through a dangling symlink would replace
		// the link with a file, or create a file the operator did not
		// name; neither is what they meant.
		if fi, lerr := os.Lstat(path); lerr == nil && fi.Mode()&os.ModeSymlink != 0 {
			return nil, fmt.Errorf("loading keys file %s: it is a symlink to a file that does not exist", path)
		}
		return f, nil
	default:
		return nil, fmt.Errorf("loading keys file %s: %w", path, err)
	}

	data, _, err := regularfile.ReadFile(f.target)
	if err != nil {
		return nil, fmt.Errorf("loading keys file %s: %w", path, err)
	}
	f.entries, err = parseFile(data)
	if err != nil {
		return nil, fmt.Errorf("loading keys file %s: %w", path, err)
	}
	f.existed = true
	f.sum = sha256.Sum256(data)
	return f, nil
}

// Path returns the path the file was loaded from, as the caller gave it
// (not with symlinks resolved).
func (f *File) Path() string { return f.path }

// Len returns the number of entries.
func (f *File) Len() int { return len(f.entries) }

// IDs returns the ids of the entries in file order.
func (f *File) IDs() []string {
	ids := make([]string, len(f.entries))
	for i, e := range f.entries {
		ids[i] = e.id
	}
	return ids
}

// Entry returns a copy of the raw JSON of the entry with the given id.
func (f *File) Entry(id string) (json.RawMessage, bool) {
	i := f.index(id)
	if i < 0 {
		return nil, false
	}
	return bytes.Clone(f.entries[i].raw), true
}

// Entries returns copies of the raw JSON of every entry, in file order.
// They are copies so that a caller cannot bypass the checks of Add and Set
// by writing into them.
func (f *File) Entries() []json.RawMessage {
	out := make([]json.RawMessage, len(f.entries))
	for i, e := range f.entries {
		out[i] = bytes.Clone(e.raw)
	}
	return out
}

// Add appends an entry, which must be a JSON object with a non-empty
// string "id". It refuses an id that is already in the file, and a "hash"
// (compared in any case, as the server does) that another entry has: the
// server would reject the whole file for either. The error names the
// other entry by id, never by hash. The entry is kept as given, less
// surrounding white space.
func (f *File) Add(entry json.RawMessage) error {
	raw := bytes.TrimSpace(entry)
	if !json.Valid(raw) {
		return errors.New("adding key: entry is not valid JSON")
	}
	e, err := parseEntry(bytes.Clone(raw))
	if err != nil {
		return fmt.Errorf("adding key: %w", err)
	}
	if err := f.checkUnique(e, -1); err != nil {
		return fmt.Errorf("adding key %q: %w", e.id, err)
	}
	f.entries = append(f.entries, e)
	return nil
}

// Set sets one top-level member of the entry with the given id to value,
// encoded as JSON, or deletes the member when value is nil. Only that
// member changes: the others keep their order and bytes, and a new member
// goes at the end, spaced like the one before it. Changing "id" or "hash"
// is checked as Add checks them.
func (f *File) Set(id, field string, value any) error {
	i := f.index(id)
	if i < 0 {
		return fmt.Errorf("setting %q: %w", field, notFound(id))
	}
	var val []byte
	if value != nil {
		var err error
		if val, err = encode(value); err != nil {
			return fmt.Errorf("setting %q of key %q: encoding the value: %w", field, id, err)
		}
	}
	raw, err := setMember(f.entries[i].raw, field, val)
	if err != nil {
		return fmt.Errorf("setting %q of key %q: %w", field, id, err)
	}
	e, err := parseEntry(raw)
	if err != nil {
		return fmt.Errorf("setting %q of key %q: %w", field, id, err)
	}
	// Only what changed is checked here, so that an entry of a file that
	// already has a duplicate hash can still be edited; whether the
	// server will load the result is the caller's to check (Bytes).
	old := f.entries[i]
	if e.id != old.id || !strings.EqualFold(e.hash, old.hash) {
		if err := f.checkUnique(e, i); err != nil {
			return fmt.Errorf("setting %q of key %q: %w", field, id, err)
		}
	}
	f.entries[i] = e
	return nil
}

// Remove deletes the entry with the given id.
func (f *File) Remove(id string) error {
	i := f.index(id)
	if i < 0 {
		return fmt.Errorf("removing key: %w", notFound(id))
	}
	f.entries = append(f.entries[:i], f.entries[i+1:]...)
	return nil
}

func notFound(id string) error {
	return fmt.Errorf("no key with id %q: %w", id, ErrNotFound)
}

func (f *File) index(id string) int {
	for i, e := range f.entries {
		if e.id == id {
			return i
		}
	}
	return -1
}

// checkUnique reports whether e's id or hash is already used by an entry
// other than the one at skip.
func (f *File) checkUnique(e entry, skip int) error {
	for j, other := range f.entries {
		if j == skip {
			continue
		}
		if other.id == e.id {
			return fmt.Errorf("a key with id %q is already in the file", e.id)
		}
		if e.hash != "" && strings.EqualFold(other.hash, e.hash) {
			return fmt.Errorf("key %q already has the same hash", other.id)
		}
	}
	return nil
}

// encode is json.Marshal without HTML escaping: a keys file is not HTML,
// and "<" reads better than "\u003c" to an operator.
func encode(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// Bytes returns the file as Save would write it now, for a caller to check
// it as a whole before saving.
func (f *File) Bytes() []byte { return f.render() }

// render returns the file as Save writes it: {"keys": [ then one entry
// per line, indented by two spaces. One entry per line keeps the diff of
// an edit to the lines of the entries it is about.
func (f *File) render() []byte {
	if len(f.entries) == 0 {
		return []byte("{\"keys\": []}\n")
	}
	n := 16
	for _, e := range f.entries {
		n += len(e.raw) + 4
	}
	buf := make([]byte, 0, n)
	buf = append(buf, "{\"keys\": [\n"...)
	for i, e := range f.entries {
		if i > 0 {
			buf = append(buf, ",\n"...)
		}
		buf = append(buf, "  "...)
		buf = append(buf, e.raw...)
	}
	return append(buf, "\n]}\n"...)
}

// Save writes the file back. It writes a temporary file in the same
// directory and renames it over the file, so that a server polling the
// file sees the old bytes or the new ones, never a mix; the temporary file
// gets the mode and owner of the file it replaces. Save refuses, wrapping
// ErrChanged, if the file is no longer what Load read (or exists when it
// did not), and leaves the file and the File as they were on any error.
//
// The check and the rename are not one atomic step: an edit made in the
// moment between them is lost. Without a lock every writer honours, that
// moment can be made short but not empty.
func (f *File) Save() error {
	data := f.render()
	if err := f.write(data); err != nil {
		return fmt.Errorf("saving keys file %s: %w", f.path, err)
	}
	f.existed = true
	f.sum = sha256.Sum256(data)
	return nil
}

func (f *File) write(data []byte) (err error) {
	dir, base := filepath.Split(f.target)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("creating a temporary file: %w", err)
	}
	tmpName := tmp.Name()
	closed := false
	defer func() {
		if err != nil {
			if !closed {
				tmp.Close()
			}
			os.Remove(tmpName)
		}
	}()

	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", tmpName, err)
	}
	// The check comes as late as it can, so that the moment in which
	// another edit would be lost is short.
	cur, err := f.current()
	if err != nil {
		return err
	}
	mode := newFileMode
	if cur != nil {
		mode = cur.Mode().Perm()
	}
	if err := tmp.Chmod(mode); err != nil {
		return fmt.Errorf("setting the mode of %s to %#o: %w", tmpName, mode, err)
	}
	if cur != nil {
		if err := keepOwner(tmp, cur); err != nil {
			return err
		}
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", tmpName, err)
	}
	closed = true
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", tmpName, err)
	}
	if err := rename(tmpName, f.target); err != nil {
		return fmt.Errorf("renaming %s over the file: %w", tmpName, err)
	}
	// Without this a crash could leave the old file, or none, after
	// the command said it was done.
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("the new file is in place, but syncing directory %s failed: %w", dir, err)
	}
	return nil
}

// current checks that the file on disk is still what Load read and
// returns its metadata (nil when it did not and does not exist).
func (f *File) current() (os.FileInfo, error) {
	if !f.existed {
		// Lstat, not Stat: a dangling symlink put there since is
		// something, and renaming over it would replace it.
		_, err := os.Lstat(f.target)
		switch {
		case errors.Is(err, os.ErrNotExist):
			return nil, nil
		case err != nil:
			return nil, fmt.Errorf("checking that the file is still missing: %w", err)
		}
		return nil, fmt.Errorf("the file was created since it was read: %w", ErrChanged)
	}
	// A symlink repointed since Load means another file now; its bytes
	// are not the ones this edit was made to.
	target, err := filepath.EvalSymlinks(f.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("the file was removed since it was read: %w", ErrChanged)
	case err != nil:
		return nil, fmt.Errorf("checking that the file has not changed: %w", err)
	case target != f.target:
		return nil, fmt.Errorf("%s now leads to %s, not %s: %w", f.path, target, f.target, ErrChanged)
	}
	data, fi, err := regularfile.ReadFile(f.target)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("the file was removed since it was read: %w", ErrChanged)
	case err != nil:
		return nil, fmt.Errorf("checking that the file has not changed: %w", err)
	case sha256.Sum256(data) != f.sum:
		return nil, ErrChanged
	}
	return fi, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		d.Close()
		return err
	}
	return d.Close()
}

// parseFile reads {"keys": [entry, ...]}, keeping each entry's bytes. Like
// the server it rejects any other top-level member, so that a file this
// package saves is not one the server refuses for its shape.
func parseFile(data []byte) ([]entry, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errors.New(`file is empty; want {"keys": [...]}`)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	syntaxErr := func(err error) error {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return errors.New("unexpected end of file (truncated JSON?)")
		}
		// The decoder's offsets are not always from the start of the
		// file; decoding the whole of it finds the place.
		var se *json.SyntaxError
		var v any
		if errors.As(json.Unmarshal(data, &v), &se) {
			line, col := lineCol(data, se.Offset)
			return fmt.Errorf("invalid JSON at line %d, column %d: %w", line, col, se)
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

	if err := expectDelim('{', `a JSON object {"keys": [...]}`); err != nil {
		return nil, err
	}
	var entries []entry
	seen := false
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, syntaxErr(err)
		}
		if tok != "keys" {
			return nil, fmt.Errorf(`unknown top-level field %s; want {"keys": [...]}`, tokenText(tok))
		}
		if seen {
			return nil, errors.New(`"keys" appears twice`)
		}
		seen = true
		if err := expectDelim('[', `an array after "keys"`); err != nil {
			return nil, err
		}
		byID := make(map[string]int)
		for i := 0; dec.More(); i++ {
			var raw json.RawMessage
			if err := dec.Decode(&raw); err != nil {
				return nil, fmt.Errorf("keys[%d]: %w", i, syntaxErr(err))
			}
			e, err := parseEntry(bytes.TrimSpace(raw))
			if err != nil {
				return nil, fmt.Errorf("keys[%d]%s: %w", i, idLabel(e.id), err)
			}
			if j, dup := byID[e.id]; dup {
				return nil, fmt.Errorf("keys[%d]%s: duplicate id (also keys[%d])", i, idLabel(e.id), j)
			}
			byID[e.id] = i
			entries = append(entries, e)
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
	if !seen {
		return nil, errors.New(`no "keys" array; want {"keys": [...]}`)
	}
	return entries, nil
}

// parseEntry checks that raw, valid JSON, is an object with a non-empty
// string "id" and no member twice, and picks out its id and hash. The
// server refuses an entry with a member twice (in any case: "Disabled" is
// "disabled" to its decoder), which encoding/json alone would read as the
// last one; an edit that set one of the two, or a command that went by
// the first, would not do what it says.
func parseEntry(raw []byte) (entry, error) {
	e := entry{raw: raw}
	if len(raw) == 0 || raw[0] != '{' {
		return e, fmt.Errorf("entry must be a JSON object, not %s", kindOf(raw))
	}
	ms, err := members(raw)
	if err != nil {
		return e, err
	}
	var repeated error
	byFold := make(map[string]string, len(ms)) // spelling by folded name
	for _, m := range ms {
		k := foldName(m.name)
		if first, ok := byFold[k]; ok {
			repeated = repeatedMember(first, m.name)
			break
		}
		byFold[k] = m.name
	}
	var idRaw []byte
	for _, m := range ms {
		// The server's JSON decoder matches member names in any case.
		switch {
		case strings.EqualFold(m.name, "id"):
			idRaw = raw[m.valStart:m.valEnd]
		case strings.EqualFold(m.name, "hash"):
			var h string
			if json.Unmarshal(raw[m.valStart:m.valEnd], &h) == nil {
				e.hash = h
			} else {
				e.hash = ""
			}
		}
	}
	if idRaw == nil {
		return e, errors.New(`missing "id"`)
	}
	if json.Unmarshal(idRaw, &e.id) != nil {
		return e, fmt.Errorf(`"id" must be a string, not %s`, kindOf(idRaw))
	}
	if e.id == "" {
		return e, errors.New(`"id" is empty`)
	}
	// Reported after the id is read, so that the error can name the
	// entry by it.
	return e, repeated
}

// foldName returns the same string for two names if and only if
// strings.EqualFold holds for them (as encoding/json folds names): each
// rune is replaced by the smallest of the runes it folds to.
func foldName(name string) string {
	return strings.Map(func(r rune) rune {
		for {
			next := unicode.SimpleFold(r)
			if next <= r {
				return next
			}
			r = next
		}
	}, name)
}

// repeatedMember is the error of an entry with a member twice, spelt first
// and then second, worded as the server words it.
func repeatedMember(first, second string) error {
	name := strings.ToLower(first)
	if first == name && second == name {
		return fmt.Errorf("%q appears twice", name)
	}
	return fmt.Errorf("%q appears twice (as %q and %q)", name, first, second)
}

// member is one name/value pair of a JSON object, as offsets into it.
type member struct {
	name             string
	keyStart, keyEnd int // the quoted name
	valStart, valEnd int
}

// members splits obj, a valid JSON object, into its top-level members
// without decoding their values, so that an edit can splice one member and
// leave every other byte alone.
func members(obj []byte) ([]member, error) {
	bad := errors.New("malformed JSON object")
	i := skipSpace(obj, 0)
	if i >= len(obj) || obj[i] != '{' {
		return nil, bad
	}
	i = skipSpace(obj, i+1)
	var ms []member
	if i < len(obj) && obj[i] == '}' {
		return ms, nil
	}
	for {
		var m member
		if i >= len(obj) || obj[i] != '"' {
			return nil, bad
		}
		m.keyStart = i
		i = skipString(obj, i)
		m.keyEnd = i
		if json.Unmarshal(obj[m.keyStart:m.keyEnd], &m.name) != nil {
			return nil, bad
		}
		i = skipSpace(obj, i)
		if i >= len(obj) || obj[i] != ':' {
			return nil, bad
		}
		m.valStart = skipSpace(obj, i+1)
		m.valEnd = skipValue(obj, m.valStart)
		if m.valEnd <= m.valStart {
			return nil, bad
		}
		ms = append(ms, m)
		i = skipSpace(obj, m.valEnd)
		if i >= len(obj) {
			return nil, bad
		}
		switch obj[i] {
		case ',':
			i = skipSpace(obj, i+1)
		case '}':
			return ms, nil
		default:
			return nil, bad
		}
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the offset just past the string that starts at i.
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(b)
}

// skipValue returns the offset just past the value that starts at i.
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return i
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for i < len(b) {
			switch b[i] {
			case '"':
				i = skipString(b, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return len(b)
	}
	for i < len(b) && !bytes.ContainsRune([]byte(",}] \t\r\n"), rune(b[i])) {
		i++
	}
	return i
}

// setMember returns a copy of obj with member field set to val, or
// deleted when val is nil. A member that appears more than once, in any
// case ("Disabled" is "disabled" to the server's decoder), is set (or
// deleted) everywhere, so that no reader can pick a stale copy.
func setMember(obj []byte, field string, val []byte) ([]byte, error) {
	ms, err := members(obj)
	if err != nil {
		return nil, err
	}
	if val == nil {
		out := bytes.Clone(obj)
		for {
			k := -1
			for j, m := range ms {
				if strings.EqualFold(m.name, field) {
					k = j
					break
				}
			}
			if k < 0 {
				return out, nil
			}
			// Take a separator with the member: the one after it,
			// or for the last member the one before it.
			start, end := ms[k].keyStart, ms[k].valEnd
			switch {
			case k < len(ms)-1:
				end = ms[k+1].keyStart
			case k > 0:
				start = ms[k-1].valEnd
			}
			out = append(out[:start:start], out[end:]...)
			if ms, err = members(out); err != nil {
				return nil, err
			}
		}
	}

	var out []byte
	last := 0
	found := false
	for _, m := range ms {
		// In any case, as the server's decoder matches it.
		if !strings.EqualFold(m.name, field) {
			continue
		}
		found = true
		out = append(out, obj[last:m.valStart]...)
		out = append(out, val...)
		last = m.valEnd
	}
	if found {
		return append(out, obj[last:]...), nil
	}

	key, err := encode(field)
	if err != nil {
		return nil, err
	}
	// A new member is spaced like the members before it, so that a
	// hand-formatted entry stays formatted the operator's way.
	sep, colon := []byte(", "), []byte(": ")
	at := bytes.IndexByte(obj, '{') + 1
	if n := len(ms); n > 0 {
		at = ms[n-1].valEnd
		colon = obj[ms[n-1].keyEnd:ms[n-1].valStart]
		if n > 1 {
			sep = obj[ms[n-2].valEnd:ms[n-1].keyStart]
		}
	} else {
		sep = nil
	}
	out = make([]byte, 0, len(obj)+len(sep)+len(key)+len(colon)+len(val))
	out = append(out, obj[:at]...)
	out = append(out, sep...)
	out = append(out, key...)
	out = append(out, colon...)
	out = append(out, val...)
	return append(out, obj[at:]...), nil
}

// kindOf names the kind of the JSON value raw, for messages that must not
// quote it (it could be a key pasted in the wrong place).
func kindOf(raw []byte) string {
	if len(raw) == 0 {
		return "nothing"
	}
	switch raw[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

// tokenText shows a JSON token in an error: strings quoted, so that no
// control character reaches a terminal as it is.
func tokenText(tok json.Token) string {
	if s, ok := tok.(string); ok {
		return fmt.Sprintf("%q", s)
	}
	return fmt.Sprint(tok)
}

func idLabel(id string) string {
	if id == "" {
		return ""
	}
	return fmt.Sprintf(" (id %q)", id)
}

func lineCol(data []byte, offset int64) (line, col int) {
	offset = min(offset, int64(len(data)))
	before := data[:offset]
	line = bytes.Count(before, []byte{'\n'}) + 1
	col = int(offset) - (bytes.LastIndexByte(before, '\n') + 1)
	return line, col
}
