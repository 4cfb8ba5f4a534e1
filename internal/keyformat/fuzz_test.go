package keyformat

import (
	"bytes"
	"strings"
	"testing"
)

// wantCheck is the test's own statement of what Check means, built on
// ValidatePrefix and makeKey rather than on Check's code.
func wantCheck(t *testing.T, key, prefix string) bool {
	t.Helper()
	if ValidatePrefix(prefix) != nil || len(key) != len(prefix)+1+RandomLen+ChecksumLen {
		return false
	}
	random := key[len(prefix)+1 : len(prefix)+1+RandomLen]
	if strings.Trim(random, base62) != "" {
		return false
	}
	return key == makeKey(t, prefix, random)
}

func FuzzCheck(f *testing.F) {
	valid := makeKey(f, "ks", random32)
	live := makeKey(f, "sk_live", random32)
	f.Add(valid, "ks")
	f.Add(live, "sk_live")
	f.Add(live, "sk")
	f.Add(valid, "kt")
	f.Add(valid[:len(valid)-1]+"0", "ks")
	f.Add(valid+"0", "ks")
	f.Add(valid[:len(valid)-1], "ks")
	f.Add(makeKey(f, "", random32), "")
	f.Add(makeKey(f, "x-y", random32), "x-y")
	f.Add(makeKey(f, "ks_", random32), "ks_")
	f.Add("ks_"+random32+"zzzzzz", "ks")
	f.Add("", "")
	f.Add("_", "")
	f.Add("ks_\xff", "ks")

	f.Fuzz(func(t *testing.T, key, prefix string) {
		ok := Check(key, prefix)
		if want := wantCheck(t, key, prefix); ok != want {
			t.Fatalf("Check(%q, %q) = %v, want %v", key, prefix, ok, want)
		}
		parsed, parsedOK := Parse(key)
		if parsedOK != (parsed != "") {
			t.Fatalf("Parse(%q) = %q, %v: ok must go with a non-empty prefix", key, parsed, parsedOK)
		}
		if parsedOK && !Check(key, parsed) {
			t.Fatalf("Parse(%q) = %q, true, but Check rejects it", key, parsed)
		}
		if !ok {
			if parsedOK && parsed == prefix {
				t.Fatalf("Parse(%q) = %q, true, but Check with that prefix is false", key, parsed)
			}
			return
		}
		if !HasPrefix(key, prefix) {
			t.Fatalf("Check(%q, %q) = true, but HasPrefix is false", key, prefix)
		}
		if want := len(prefix) + 1 + RandomLen + ChecksumLen; len(key) != want {
			t.Fatalf("Check(%q, %q) = true for length %d, want %d", key, prefix, len(key), want)
		}
		if !parsedOK || parsed != prefix {
			t.Fatalf("Check(%q, %q) = true, but Parse = %q, %v", key, prefix, parsed, parsedOK)
		}
		if err := ValidatePrefix(prefix); err != nil {
			t.Fatalf("Check(%q, %q) = true for an invalid prefix: %v", key, prefix, err)
		}
	})
}

func FuzzNew(f *testing.F) {
	f.Add("ks", countingBytes(RandomLen))
	f.Add("sk_live", countingBytes(64))
	f.Add("ks", append(bytes.Repeat([]byte{0xff}, 40), countingBytes(RandomLen)...))
	f.Add("ks", countingBytes(RandomLen-1))
	f.Add("ks", bytes.Repeat([]byte{0xff}, 2000))
	f.Add("x-y", countingBytes(RandomLen))
	f.Add("", countingBytes(RandomLen))

	f.Fuzz(func(t *testing.T, prefix string, data []byte) {
		// accepted is the random part rejection sampling must produce: the
		// first RandomLen bytes below 248, each reduced modulo 62. used is
		// how many bytes of data that takes.
		var accepted []byte
		used := 0
		for _, b := range data {
			if len(accepted) == RandomLen {
				break
			}
			used++
			if b < 248 {
				accepted = append(accepted, base62[b%62])
			}
		}

		key, err := New(prefix, bytes.NewReader(data))
		if err != nil {
			if ValidatePrefix(prefix) == nil && len(accepted) == RandomLen && used <= maxRandomBytes {
				t.Fatalf("New(%q) with %d usable bytes failed: %v", prefix, used, err)
			}
			return
		}
		if ValidatePrefix(prefix) != nil {
			t.Fatalf("New(%q) = %q for an invalid prefix", prefix, key)
		}
		if len(accepted) < RandomLen {
			t.Fatalf("New(%q) = %q from only %d acceptable bytes", prefix, key, len(accepted))
		}
		if want := makeKey(t, prefix, string(accepted)); key != want {
			t.Fatalf("New(%q) = %q, want %q", prefix, key, want)
		}
		if !Check(key, prefix) {
			t.Fatalf("Check(%q, %q) = false for a key from New", key, prefix)
		}
		if got, ok := Parse(key); !ok || got != prefix {
			t.Fatalf("Parse(%q) = %q, %v, want %q, true", key, got, ok, prefix)
		}
	})
}
