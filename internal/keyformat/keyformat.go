// Package keyformat defines the format of the API keys this plugin issues:
//
//	<prefix>_<32 base62 random characters><6 base62 characters of checksum>
//
// The format follows GitHub's tokens. The random part carries about 190 bits
// of entropy (32 characters of base62), comfortably above the 180 bits that
// make guessing hopeless. Keys hold only letters, digits and underscores, so a
// double click selects a whole key in terminals and editors. The checksum is
// a CRC32 over everything before it, which lets a client, a secret scanner or
// the handler reject a mistyped or truncated key offline, without a lookup.
//
// The checksum is not a secret and not a MAC: anyone can compute it. It only
// separates well-formed keys from noise cheaply; whether a key is valid is
// still decided by looking it up.
package keyformat

import (
	"crypto/rand"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"unsafe"
)

const (
	// RandomLen is the number of base62 characters in the random part of a
	// key. 32 characters carry 32·log2(62) ≈ 190.5 bits.
	RandomLen = 32

	// ChecksumLen is the number of base62 characters that encode the CRC32.
	// Six are enough because 62^6 ≈ 5.7·10^10 exceeds 2^32.
	ChecksumLen = 6

	// MaxPrefixLen is the longest prefix ValidatePrefix accepts. It keeps
	// keys short enough for headers and command lines.
	MaxPrefixLen = 32

	// tailLen is what follows the separating underscore.
	tailLen = RandomLen + ChecksumLen

	// maxRandomBytes bounds how many bytes New reads before it gives up. A
	// healthy source rejects a byte with probability 8/256, so needing more
	// than 1024 bytes for 32 characters never happens in practice; the bound
	// turns a broken source (one that returns only 0xff, say) into an error
	// instead of an endless loop.
	maxRandomBytes = 1024

	// acceptBelow is the largest multiple of 62 that fits in a byte. Bytes at
	// or above it are rejected so that b%62 is uniform over the alphabet.
	acceptBelow = 62 * 4 // 248
)

// alphabet is the base62 alphabet in the order digits, upper case, lower case,
// so that a character's index is its digit value.
const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// digitValue maps a byte to its base62 value, or -1 for bytes outside the
// alphabet. A table keeps Check branch-light on the request path.
var digitValue = func() (t [256]int8) {
	for i := range t {
		t[i] = -1
	}
	for i := range len(alphabet) {
		t[alphabet[i]] = int8(i)
	}
	return t
}()

// ValidatePrefix reports why p cannot be a key prefix, or nil if it can. A
// prefix is 1 to MaxPrefixLen letters, digits and underscores and does not
// start or end with an underscore, so that the underscore before the random
// part stays unambiguous and "sk_live" is still possible.
func ValidatePrefix(p string) error {
	if p == "" {
		return errors.New(`prefix "": must not be empty`)
	}
	for i, r := range p {
		if r > 0x7f || !isWordByte(byte(r)) {
			return fmt.Errorf("prefix %q: invalid character %q at byte %d, want letters, digits and underscores", p, r, i)
		}
	}
	if len(p) > MaxPrefixLen {
		return fmt.Errorf("prefix %q: %d characters, want at most %d", p, len(p), MaxPrefixLen)
	}
	if p[0] == '_' || p[len(p)-1] == '_' {
		return fmt.Errorf("prefix %q: must not start or end with an underscore", p)
	}
	return nil
}

// validPrefix is ValidatePrefix without the error, for the request path,
// where building an error would allocate.
func validPrefix(p string) bool {
	if len(p) == 0 || len(p) > MaxPrefixLen || p[0] == '_' || p[len(p)-1] == '_' {
		return false
	}
	for i := 0; i < len(p); i++ {
		if !isWordByte(p[i]) {
			return false
		}
	}
	return true
}

// isWordByte reports whether b is one of [A-Za-z0-9_], the characters a
// double click selects as one word.
func isWordByte(b byte) bool {
	return b == '_' || digitValue[b] >= 0
}

// Generate returns a new key with the given prefix, drawing its random part
// from crypto/rand.
func Generate(prefix string) (string, error) {
	return New(prefix, rand.Reader)
}

// New is Generate with the source of randomness passed in, so tests can make
// keys deterministic. Each random character comes from one byte of rnd;
// bytes of 248 and above are rejected and drawn again, because 256 is not a
// multiple of 62 and b%62 over all bytes would favour the first eight
// characters. New reads only as many bytes as it consumes.
func New(prefix string, rnd io.Reader) (string, error) {
	if err := ValidatePrefix(prefix); err != nil {
		return "", err
	}
	key := make([]byte, len(prefix)+1+tailLen)
	copy(key, prefix)
	key[len(prefix)] = '_'
	random := key[len(prefix)+1 : len(prefix)+1+RandomLen]

	var buf [RandomLen]byte
	filled, drawn := 0, 0
	for filled < RandomLen {
		if drawn >= maxRandomBytes {
			return "", fmt.Errorf("generating key: %d random bytes gave only %d of %d characters; the random source looks broken", drawn, filled, RandomLen)
		}
		need := buf[:RandomLen-filled]
		if _, err := io.ReadFull(rnd, need); err != nil {
			return "", fmt.Errorf("generating key: reading random bytes: %w", err)
		}
		drawn += len(need)
		for _, b := range need {
			if b < acceptBelow {
				random[filled] = alphabet[b%62]
				filled++
			}
		}
	}

	body := key[:len(key)-ChecksumLen]
	putChecksum(key[len(body):], crc32.ChecksumIEEE(body))
	return string(key), nil
}

// putChecksum writes sum into dst as ChecksumLen base62 digits, most
// significant first, left-padded with '0'.
func putChecksum(dst []byte, sum uint32) {
	v := uint64(sum)
	for i := ChecksumLen - 1; i >= 0; i-- {
		dst[i] = alphabet[v%62]
		v /= 62
	}
}

// Check reports whether key is a well-formed key with the given prefix: the
// prefix, an underscore, RandomLen base62 characters and ChecksumLen base62
// characters encoding the CRC32 of everything before them. An invalid prefix
// never checks, so a key that passes Check also parses back to its prefix.
//
// Check runs on every request, so it does not allocate. It is not constant
// time, and need not be: the checksum is derived from public parts of the key
// and its verdict says nothing about whether the key is issued.
func Check(key, prefix string) bool {
	if len(key) != len(prefix)+1+tailLen || !HasPrefix(key, prefix) || !validPrefix(prefix) {
		return false
	}
	body := key[:len(key)-ChecksumLen]
	for i := len(prefix) + 1; i < len(body); i++ {
		if digitValue[body[i]] < 0 {
			return false
		}
	}
	// 62^6 < 2^36, so six digits cannot overflow a uint64. Values above
	// 2^32-1 simply never match, which keeps the encoding canonical.
	var sum uint64
	for i := len(body); i < len(key); i++ {
		d := digitValue[key[i]]
		if d < 0 {
			return false
		}
		sum = sum*62 + uint64(d)
	}
	return sum == uint64(checksumString(body))
}

// checksumString is crc32.ChecksumIEEE over the bytes of s. Converting s with
// []byte(s) would copy it to the heap on every request, because crc32 hands
// its input to a function variable that escape analysis cannot see through.
// crc32 only reads its input, so a read-only view of the string's bytes is
// safe, and it keeps the hardware-accelerated implementation (about twice as
// fast as a byte-at-a-time table loop over a key).
func checksumString(s string) uint32 {
	return crc32.ChecksumIEEE(unsafe.Slice(unsafe.StringData(s), len(s)))
}

// HasPrefix reports whether key starts with prefix and an underscore, which is
// how a caller recognises a key that claims one of its declared prefixes. It
// does not check the rest of the key; a key that has the prefix must still
// pass Check. With overlapping prefixes such as "sk" and "sk_live", a
// "sk_live_" key has both; callers should try the longest prefix first.
func HasPrefix(key, prefix string) bool {
	return len(key) > len(prefix) && key[len(prefix)] == '_' && key[:len(prefix)] == prefix
}

// Parse returns the prefix of key if key is well formed and its checksum
// matches. The prefix ends at the last underscore, because neither the random
// part nor the checksum contains one.
func Parse(key string) (prefix string, ok bool) {
	i := strings.LastIndexByte(key, '_')
	if i < 0 || len(key)-i-1 != tailLen {
		return "", false
	}
	prefix = key[:i]
	if !Check(key, prefix) {
		return "", false
	}
	return prefix, true
}
