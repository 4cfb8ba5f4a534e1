package apikey

import (
	"bytes"
	"encoding/binary"
	"hash/maphash"
	"slices"
	"strings"
	"unicode/utf8"
	"unsafe"
)

// scanKeysFile is parseKeysFile's fast path, for the keys files that people
// and tools write: {"keys": [...]} whose entries are objects of the known
// fields, each once, with strings as they are written (no escapes) and
// whole numbers. An entry that is anything more (an escape, a null, a field
// name in another case) is decoded by encoding/json alone, as
// decodeKeysFile would decode it; one with a field twice, or a metadata
// field twice, is an error there. Anything else it does not take: it
// returns nil, never an error, and decodeKeysFile reads the whole file
// again, which is also how every error is found and worded.
//
// It allocates little besides what the records keep: strings are read in
// place, and those a record keeps are copied into shared blocks (a
// stringArena); digests are decoded from the file's hex; the set's map is
// made at its final size.
func scanKeysFile(data []byte, a *recordAlloc) *keySet {
	s := keyScanner{data: data}
	s.space()
	if !s.skip('{') {
		return nil
	}
	s.space()
	if name, ok := s.str(); !ok || name != "keys" {
		return nil
	}
	s.space()
	if !s.skip(':') {
		return nil
	}
	s.space()
	if !s.skip('[') {
		return nil
	}
	// Each entry has one "hash" field: its count sizes the index, which
	// then never grows (growing leaves the smaller tables as garbage).
	n := bytes.Count(data, []byte(`"hash"`))
	set := newKeySet(n)
	// Duplicate ids are found by sorting hashes of the ids rather than
	// in a map from id, which would be as large as the set's, and garbage.
	idSums := make([]uint64, 0, n)
	seed := maphash.MakeSeed()
	s.space()
	if !s.skip(']') {
		for {
			rec := s.entry(a)
			if rec == nil {
				return nil
			}
			if set.byDigest.add(rec) != nil {
				return nil // a duplicate hash
			}
			idSums = append(idSums, maphash.String(seed, rec.id))
			s.space()
			if s.skip(',') {
				s.space()
				continue
			}
			if s.skip(']') {
				break
			}
			return nil
		}
	}
	s.space()
	if !s.skip('}') {
		return nil
	}
	s.space()
	if s.pos != len(data) {
		return nil
	}
	// Equal hashes are almost surely an id twice (an error that
	// decodeKeysFile words); two ids with the same hash (for a million
	// ids, a chance of 3 in 100 million) only cost the slow path.
	slices.Sort(idSums)
	for i := 1; i < len(idSums); i++ {
		if idSums[i] == idSums[i-1] {
			return nil
		}
	}
	return set
}

// keyScanner reads a keys file from pos.
type keyScanner struct {
	data []byte
	pos  int
	strs stringArena
}

// entry reads one entry and makes its record; nil if either fails.
func (s *keyScanner) entry(a *recordAlloc) *keyRecord {
	start := s.pos
	var e keyFileEntry
	var burst int64
	seen, ok := s.flatEntry(&e, &burst, a)
	if !ok {
		// encoding/json reads what flatEntry does not, the entry
		// alone (into another variable: e stays on the stack).
		je, end := decodeEntry(s.data, start)
		if je == nil {
			return nil
		}
		e, seen, s.pos = *je, 0, end
	}
	if seen&bitBurst != 0 {
		b := burst // on the heap, as build keeps e's content
		e.Burst = &b
	}
	rec, err := e.build(a)
	if err != nil {
		return nil
	}
	return rec
}

// decodeEntry decodes with encoding/json the entry that starts at start,
// and returns its end; nil if it fails. The entry's end is found by its
// brackets; encoding/json checks the rest, and must end where they do (it
// refuses data after the value's end, as it refuses a value cut short).
func decodeEntry(data []byte, start int) (*keyFileEntry, int) {
	end := jsonObjectEnd(data, start)
	if end < 0 {
		return nil, 0
	}
	e := new(keyFileEntry)
	if decodeEntryJSON(data[start:end], e) != nil {
		return nil, 0
	}
	return e, end
}

// Bits of keyScanner.flatEntry's fields seen.
const (
	bitID = 1 << iota
	bitHash
	bitName
	bitOwner
	bitPlan
	bitRate
	bitBurst
	bitQuota
	bitNotBefore
	bitExpires
	bitDisabled
	bitMetadata
	bitAllowIPs
	bitAllowReferrers
	bitAllowMethods
	bitAllowPaths
)

// flatEntry reads an entry into e, as encoding/json would, if it is an
// object of keyFileEntry's fields by their exact names, each once, with
// values of their own type (no null) and strings without escapes. It
// reports false for anything else. The strings that a record keeps are
// copies; Hash, Rate, Quota, NotBefore and Expires are views of the file.
// It returns the bits of the fields seen, and a burst in *burst, not in
// e.Burst: a pointer stored through e would move it to the heap.
func (s *keyScanner) flatEntry(e *keyFileEntry, burst *int64, a *recordAlloc) (seen uint32, ok bool) {
	if !s.skip('{') {
		return 0, false
	}
	s.space()
	if s.skip('}') {
		return 0, true
	}
	for {
		name, ok := s.str()
		if !ok {
			return 0, false
		}
		s.space()
		if !s.skip(':') {
			return 0, false
		}
		s.space()
		var bit uint32
		switch name {
		case "id":
			bit = bitID
			e.ID, ok = s.str()
			e.ID = s.strs.copy(e.ID)
		case "hash":
			bit = bitHash
			e.Hash, ok = s.str()
		case "name":
			bit = bitName
			e.Name, ok = s.str()
			e.Name = s.strs.copy(e.Name)
		case "owner":
			bit = bitOwner
			e.Owner, ok = s.str()
			e.Owner = s.strs.copy(e.Owner)
		case "plan":
			bit = bitPlan
			e.Plan, ok = s.str()
			e.Plan = a.intern(e.Plan)
		case "rate":
			bit = bitRate
			e.Rate, ok = s.str()
		case "burst":
			bit = bitBurst
			*burst, ok = s.int()
		case "quota":
			bit = bitQuota
			e.Quota, ok = s.str()
		case "not_before":
			bit = bitNotBefore
			e.NotBefore, ok = s.str()
		case "expires":
			bit = bitExpires
			e.Expires, ok = s.str()
		case "disabled":
			bit = bitDisabled
			e.Disabled, ok = s.bool()
		case "metadata":
			bit = bitMetadata
			e.Metadata, ok = s.metadata()
		case "allow_ips":
			bit = bitAllowIPs
			e.AllowIPs, ok = s.strList()
		case "allow_referrers":
			bit = bitAllowReferrers
			e.AllowReferrers, ok = s.strList()
		case "allow_methods":
			bit = bitAllowMethods
			e.AllowMethods, ok = s.strList()
		case "allow_paths":
			bit = bitAllowPaths
			e.AllowPaths, ok = s.strList()
		}
		if !ok || bit == 0 || seen&bit != 0 {
			return 0, false
		}
		seen |= bit
		s.space()
		if !s.skip(',') {
			return seen, s.skip('}')
		}
		s.space()
	}
}

// space skips JSON white space.
func (s *keyScanner) space() {
	for s.pos < len(s.data) {
		switch s.data[s.pos] {
		case ' ', '\n', '\t', '\r':
			s.pos++
		default:
			return
		}
	}
}

// skip skips c if it is next.
func (s *keyScanner) skip(c byte) bool {
	if s.pos < len(s.data) && s.data[s.pos] == c {
		s.pos++
		return true
	}
	return false
}

// str reads a string that encoding/json would read as it is written: no
// escapes, no control characters, valid UTF-8. It returns a view of the
// file, not a copy.
func (s *keyScanner) str() (string, bool) {
	if !s.skip('"') {
		return "", false
	}
	i, ascii := s.pos, true
	// Eight bytes at a time while none of them needs a look; the
	// bytes from the first one that does, one by one.
	for i+8 <= len(s.data) && plainWord(binary.LittleEndian.Uint64(s.data[i:])) {
		i += 8
	}
	for ; i < len(s.data); i++ {
		c := s.data[i]
		if c < 0x20 || c == '"' || c == '\\' {
			break
		}
		if c >= 0x80 {
			ascii = false
		}
	}
	if i == len(s.data) || s.data[i] != '"' {
		return "", false
	}
	b := s.data[s.pos:i]
	if !ascii && !utf8.Valid(b) {
		// encoding/json would replace the invalid bytes.
		return "", false
	}
	s.pos = i + 1
	return unsafe.String(unsafe.SliceData(b), len(b)), true
}

// plainWord reports whether none of the eight bytes in x is a quote, a
// backslash, a control character or beyond ASCII. Subtracting 1 (or 0x20)
// from every byte sets the top bit of a byte that was 0 (or below 0x20);
// &^x discards the bytes whose top bit was set already, which the final |x
// catches. (A borrow can only come from a byte already caught.)
func plainWord(x uint64) bool {
	const ones, tops = 0x0101010101010101, 0x8080808080808080
	quote, backslash := x^(ones*'"'), x^(ones*'\\')
	found := (quote-ones)&^quote | (backslash-ones)&^backslash | (x-ones*0x20)&^x | x
	return found&tops == 0
}

// int reads a whole number of at most 18 digits, without fraction or
// exponent, as JSON writes it.
func (s *keyScanner) int() (int64, bool) {
	i := s.pos
	neg := i < len(s.data) && s.data[i] == '-'
	if neg {
		i++
	}
	start := i
	var n int64
	for ; i < len(s.data) && s.data[i] >= '0' && s.data[i] <= '9'; i++ {
		n = n*10 + int64(s.data[i]-'0')
	}
	if digits := i - start; digits == 0 || digits > 18 || digits > 1 && s.data[start] == '0' {
		return 0, false
	}
	// A fraction or an exponent is left unread, and then fails the
	// caller's check for the next ',' or '}'.
	s.pos = i
	if neg {
		n = -n
	}
	return n, true
}

func (s *keyScanner) bool() (bool, bool) {
	rest := s.data[s.pos:]
	switch {
	case bytes.HasPrefix(rest, []byte("true")):
		s.pos += len("true")
		return true, true
	case bytes.HasPrefix(rest, []byte("false")):
		s.pos += len("false")
		return false, true
	}
	return false, false
}

// metadata reads an object of strings, copied. An empty one is nil, which
// is what an empty map means in a keyFileEntry.
func (s *keyScanner) metadata() (map[string]string, bool) {
	if !s.skip('{') {
		return nil, false
	}
	s.space()
	if s.skip('}') {
		return nil, true
	}
	m := make(map[string]string)
	for {
		k, ok := s.str()
		if !ok {
			return nil, false
		}
		s.space()
		if !s.skip(':') {
			return nil, false
		}
		s.space()
		v, ok := s.str()
		if !ok {
			return nil, false
		}
		// A name twice is an error, which decodeKeysFile words;
		// counting the map's entries finds it without a lookup.
		n := len(m)
		m[s.strs.copy(k)] = s.strs.copy(v)
		if len(m) == n {
			return nil, false
		}
		s.space()
		if !s.skip(',') {
			return m, s.skip('}')
		}
		s.space()
	}
}

// strList reads an array of strings, copied; an empty one is not nil.
func (s *keyScanner) strList() ([]string, bool) {
	if !s.skip('[') {
		return nil, false
	}
	s.space()
	list := []string{}
	if s.skip(']') {
		return list, true
	}
	for {
		v, ok := s.str()
		if !ok {
			return nil, false
		}
		list = append(list, s.strs.copy(v))
		s.space()
		if !s.skip(',') {
			return list, s.skip(']')
		}
		s.space()
	}
}

// jsonObjectEnd returns the end of the object that starts at i, found by
// its brackets alone, or -1.
func jsonObjectEnd(data []byte, i int) int {
	if i >= len(data) || data[i] != '{' {
		return -1
	}
	depth := 0
	for ; i < len(data); i++ {
		switch data[i] {
		case '"':
			for i++; i < len(data) && data[i] != '"'; i++ {
				if data[i] == '\\' {
					i++
				}
			}
		case '{', '[':
			depth++
		case '}', ']':
			if depth--; depth == 0 {
				return i + 1
			}
		}
	}
	return -1
}

// stringArena copies strings into shared blocks, so that a million short
// ids are a few hundred allocations, not a million. A block lives as long
// as any string in it; blocks are small so that a few records kept past a
// reload (in the cache, by a request) keep little else.
type stringArena struct {
	block []byte
}

const arenaBlockSize = 16 << 10

func (a *stringArena) copy(s string) string {
	if s == "" {
		return ""
	}
	if len(s) > arenaBlockSize/16 {
		return strings.Clone(s)
	}
	if cap(a.block)-len(a.block) < len(s) {
		a.block = make([]byte, 0, arenaBlockSize)
	}
	a.block = append(a.block, s...)
	return unsafe.String(&a.block[len(a.block)-len(s)], len(s))
}

// intern returns a copy of s, the same for every s of a file: plan names
// repeat.
func (a *recordAlloc) intern(s string) string {
	if s == "" {
		return ""
	}
	if c, ok := a.strs[s]; ok {
		return c
	}
	if a.strs == nil {
		a.strs = make(map[string]string)
	}
	c := strings.Clone(s)
	a.strs[c] = c
	return c
}
