package keyformat

import (
	"bytes"
	"errors"
	"hash/crc32"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// base62 is the alphabet spelled out once more, so the tests do not trust the
// package's own constant.
const base62 = "0123456789" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"

// encodeChecksum is the test's own base62 encoding of a CRC32: six digits,
// most significant first, left-padded with '0'.
func encodeChecksum(t testing.TB, sum uint32) string {
	t.Helper()
	var digits []byte
	for v := uint64(sum); v > 0; v /= 62 {
		digits = append([]byte{base62[v%62]}, digits...)
	}
	if len(digits) > 6 {
		t.Fatalf("checksum %d needs %d digits", sum, len(digits))
	}
	return strings.Repeat("0", 6-len(digits)) + string(digits)
}

// makeKey builds a key from its parts without any validation, so tests can
// build keys New would refuse to make.
func makeKey(t testing.TB, prefix, random string) string {
	t.Helper()
	body := prefix + "_" + random
	return body + encodeChecksum(t, crc32.ChecksumIEEE([]byte(body)))
}

// mustNew calls New and fails the test on error.
func mustNew(t testing.TB, prefix string, rnd io.Reader) string {
	t.Helper()
	key, err := New(prefix, rnd)
	if err != nil {
		t.Fatalf("New(%q): %v", prefix, err)
	}
	return key
}

// countingBytes returns n bytes 0, 1, 2, … so that the random part is
// predictable: byte i becomes base62[i%62].
func countingBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}

// random32 is the random part New makes from countingBytes(RandomLen).
const random32 = "0123456789ABCDEFGHIJKLMNOPQRSTUV"

func TestValidatePrefix(t *testing.T) {
	tests := []struct {
		name    string
		prefix  string
		wantErr string
	}{
		{"short", "k", ""},
		{"letters", "keystile", ""},
		{"mixed case and digits", "Ks2", ""},
		{"inner underscore", "sk_live", ""},
		{"several underscores", "a_b_c", ""},
		{"digits only", "42", ""},
		{"max length", strings.Repeat("a", 32), ""},
		{"empty", "", `prefix "": must not be empty`},
		{"too long", strings.Repeat("a", 33), `prefix "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": 33 characters, want at most 32`},
		{"hyphen", "x-y", `prefix "x-y": invalid character '-' at byte 1`},
		{"space", "sk live", `invalid character ' ' at byte 2`},
		{"dot", "sk.", `invalid character '.'`},
		{"non-ASCII", "clé", `prefix "clé": invalid character 'é' at byte 2`},
		{"invalid UTF-8", "a\xff", `invalid character`},
		{"NUL", "a\x00b", `invalid character '\x00' at byte 1`},
		{"leading underscore", "_sk", `prefix "_sk": must not start or end with an underscore`},
		{"trailing underscore", "sk_", `prefix "sk_": must not start or end with an underscore`},
		{"underscore only", "_", `must not start or end with an underscore`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidatePrefix(tt.prefix)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("ValidatePrefix(%q) = %v, want nil", tt.prefix, err)
				}
				if !validPrefix(tt.prefix) {
					t.Errorf("validPrefix(%q) = false, want true", tt.prefix)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ValidatePrefix(%q) = %v, want error containing %q", tt.prefix, err, tt.wantErr)
			}
			if validPrefix(tt.prefix) {
				t.Errorf("validPrefix(%q) = true, want false", tt.prefix)
			}
			if _, err := New(tt.prefix, bytes.NewReader(countingBytes(RandomLen))); err == nil {
				t.Errorf("New(%q) succeeded, want error", tt.prefix)
			}
		})
	}
}

func TestGenerate(t *testing.T) {
	for _, prefix := range []string{"k", "ks", "sk_live", strings.Repeat("Z", 32)} {
		t.Run(prefix, func(t *testing.T) {
			seen := make(map[string]bool)
			for range 100 {
				key, err := Generate(prefix)
				if err != nil {
					t.Fatalf("Generate(%q): %v", prefix, err)
				}
				if want := len(prefix) + 1 + RandomLen + ChecksumLen; len(key) != want {
					t.Fatalf("len(%q) = %d, want %d", key, len(key), want)
				}
				if !strings.HasPrefix(key, prefix+"_") {
					t.Fatalf("key %q does not start with %q", key, prefix+"_")
				}
				tail := key[len(prefix)+1:]
				if strings.Trim(tail, base62) != "" {
					t.Fatalf("tail %q of key has characters outside base62", tail)
				}
				if !Check(key, prefix) {
					t.Fatalf("Check(%q, %q) = false, want true", key, prefix)
				}
				if !HasPrefix(key, prefix) {
					t.Fatalf("HasPrefix(%q, %q) = false, want true", key, prefix)
				}
				if got, ok := Parse(key); !ok || got != prefix {
					t.Fatalf("Parse(%q) = %q, %v, want %q, true", key, got, ok, prefix)
				}
				if seen[key] {
					t.Fatalf("Generate(%q) repeated key %q", prefix, key)
				}
				seen[key] = true
			}
		})
	}

	t.Run("invalid prefix", func(t *testing.T) {
		if key, err := Generate("x-y"); err == nil {
			t.Fatalf("Generate(%q) = %q, want error", "x-y", key)
		}
	})
}

func TestNewKnownVector(t *testing.T) {
	tests := []struct {
		name   string
		prefix string
	}{
		{"simple prefix", "ks"},
		{"prefix with underscore", "sk_live"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := tt.prefix + "_" + random32
			want := body + encodeChecksum(t, crc32.ChecksumIEEE([]byte(body)))

			got := mustNew(t, tt.prefix, bytes.NewReader(countingBytes(RandomLen)))
			if got != want {
				t.Fatalf("New(%q) = %q, want %q", tt.prefix, got, want)
			}
			if !Check(want, tt.prefix) {
				t.Fatalf("Check(%q, %q) = false, want true", want, tt.prefix)
			}
		})
	}
}

func TestNewRejectionSampling(t *testing.T) {
	// high is every byte New must reject, repeated; none of them may show up
	// in the key or shift which valid byte becomes which character.
	high := bytes.Repeat([]byte{248, 249, 250, 251, 252, 253, 254, 255}, 20)
	tests := []struct {
		name string
		rnd  io.Reader
		want string
	}{
		{
			name: "rejected bytes first",
			rnd:  io.MultiReader(bytes.NewReader(high), bytes.NewReader(countingBytes(RandomLen))),
			want: random32,
		},
		{
			name: "rejected bytes interleaved",
			rnd: func() io.Reader {
				var b []byte
				for _, c := range countingBytes(RandomLen) {
					b = append(b, 255, 248, c)
				}
				return bytes.NewReader(b)
			}(),
			want: random32,
		},
		{
			name: "one byte per read",
			rnd:  iotest.OneByteReader(io.MultiReader(bytes.NewReader(high), bytes.NewReader(countingBytes(RandomLen)))),
			want: random32,
		},
		{
			// 247 is the largest accepted byte: 247 % 62 = 61, the last character.
			name: "largest accepted byte",
			rnd:  bytes.NewReader(bytes.Repeat([]byte{247}, RandomLen)),
			want: strings.Repeat("z", RandomLen),
		},
		{
			// 62, 124 and 186 wrap around to the first character.
			name: "bytes wrap modulo 62",
			rnd:  bytes.NewReader(bytes.Repeat([]byte{62, 124, 186, 0}, RandomLen/4)),
			want: strings.Repeat("0", RandomLen),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := mustNew(t, "ks", tt.rnd)
			if want := makeKey(t, "ks", tt.want); key != want {
				t.Fatalf("New = %q, want %q", key, want)
			}
		})
	}

	t.Run("reads no more than it uses", func(t *testing.T) {
		r := bytes.NewReader(append(append(high[:3:3], countingBytes(RandomLen)...), 1, 2, 3))
		mustNew(t, "ks", r)
		if r.Len() != 3 {
			t.Fatalf("New left %d bytes unread, want 3", r.Len())
		}
	})
}

func TestNewReaderErrors(t *testing.T) {
	errBroken := errors.New("entropy pool on fire")
	tests := []struct {
		name    string
		rnd     io.Reader
		wantIs  error
		wantErr string
	}{
		{"empty reader", bytes.NewReader(nil), io.EOF, "reading random bytes"},
		{"short reader", bytes.NewReader(countingBytes(RandomLen - 1)), io.ErrUnexpectedEOF, "reading random bytes"},
		{"only rejected bytes then EOF", bytes.NewReader(bytes.Repeat([]byte{255}, 100)), nil, "reading random bytes"},
		{"reader error", iotest.ErrReader(errBroken), errBroken, "reading random bytes"},
		{"endless rejected bytes", endless(0xff), nil, "random source looks broken"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key, err := New("ks", tt.rnd)
			if err == nil {
				t.Fatalf("New = %q, want error", key)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("New error = %q, want it to contain %q", err, tt.wantErr)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("New error = %v, want it to wrap %v", err, tt.wantIs)
			}
			if key != "" {
				t.Errorf("New returned key %q with its error", key)
			}
		})
	}
}

// endless is a reader that returns the same byte forever.
type endless byte

func (e endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(e)
	}
	return len(p), nil
}

func TestCheck(t *testing.T) {
	good := makeKey(t, "ks", random32)
	goodLive := makeKey(t, "sk_live", random32)
	body := "ks_" + random32
	sum := crc32.ChecksumIEEE([]byte(body))
	tests := []struct {
		name   string
		key    string
		prefix string
		want   bool
	}{
		{"valid", good, "ks", true},
		{"valid prefix with underscore", goodLive, "sk_live", true},
		{"valid all zero random", makeKey(t, "ks", strings.Repeat("0", RandomLen)), "ks", true},
		{"valid all z random", makeKey(t, "ks", strings.Repeat("z", RandomLen)), "ks", true},
		{"empty key", "", "ks", false},
		{"prefix only", "ks_", "ks", false},
		{"wrong prefix", good, "kt", false},
		{"prefix of the prefix", goodLive, "sk", false},
		{"longer prefix", good, "ks_x", false},
		{"prefix case differs", good, "KS", false},
		{"key with other valid prefix", makeKey(t, "kt", random32), "ks", false},
		{"empty prefix", makeKey(t, "", random32), "", false},
		{"invalid prefix with valid checksum", makeKey(t, "x-y", random32), "x-y", false},
		{"prefix ending in underscore with valid checksum", makeKey(t, "ks_", random32), "ks_", false},
		{"prefix too long with valid checksum", makeKey(t, strings.Repeat("a", 33), random32), strings.Repeat("a", 33), false},
		{"one character short", good[:len(good)-1], "ks", false},
		{"one character long", good + "0", "ks", false},
		{"random part one short, valid checksum", makeKey(t, "ks", random32[1:]), "ks", false},
		{"random part one long, valid checksum", makeKey(t, "ks", random32+"0"), "ks", false},
		{"separator replaced", "ks-" + good[3:], "ks", false},
		{"hyphen in random part", makeKey(t, "ks", "-"+random32[1:]), "ks", false},
		{"underscore in random part", makeKey(t, "ks", "_"+random32[1:]), "ks", false},
		{"NUL in random part", makeKey(t, "ks", "\x00"+random32[1:]), "ks", false},
		{"high byte in random part", makeKey(t, "ks", "\xff"+random32[1:]), "ks", false},
		{"underscore in checksum", body + "_" + good[len(good)-5:], "ks", false},
		{"high byte in checksum", body + "\xc3" + good[len(good)-5:], "ks", false},
		// zzzzzz is 62^6-1, above any CRC32: the decoder must not wrap it.
		{"checksum above 2^32", body + "zzzzzz", "ks", false},
		{"checksum plus 2^32", body + plus2to32(t, sum), "ks", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Check(tt.key, tt.prefix); got != tt.want {
				t.Fatalf("Check(%q, %q) = %v, want %v", tt.key, tt.prefix, got, tt.want)
			}
		})
	}
}

// plus2to32 encodes sum+2^32 in six base62 digits: the same value modulo
// 2^32, which a decoder that truncated to uint32 would wrongly accept.
func plus2to32(t *testing.T, sum uint32) string {
	t.Helper()
	v := uint64(sum) + 1<<32
	d := make([]byte, 6)
	for i := 5; i >= 0; i-- {
		d[i] = base62[v%62]
		v /= 62
	}
	if v != 0 {
		t.Fatalf("%d does not fit in six base62 digits", uint64(sum)+1<<32)
	}
	return string(d)
}

func TestCheckDetectsSingleCharacterChange(t *testing.T) {
	// CRC32 detects every error burst of up to 32 bits, so any single changed
	// byte in the body is caught; a changed checksum digit changes its value.
	for _, prefix := range []string{"ks", "sk_live"} {
		t.Run(prefix, func(t *testing.T) {
			key := mustNew(t, prefix, bytes.NewReader(countingBytes(RandomLen)))
			start := len(prefix) + 1
			replacements := base62 + "_-+/=.\x00\xff"
			checked := 0
			for pos := start; pos < len(key); pos++ {
				for _, c := range []byte(replacements) {
					if c == key[pos] {
						continue
					}
					bad := []byte(key)
					bad[pos] = c
					if Check(string(bad), prefix) {
						t.Errorf("Check accepts %q, which differs from %q at byte %d", bad, key, pos)
					}
					if got, ok := Parse(string(bad)); ok {
						t.Errorf("Parse(%q) = %q, true, want false", bad, got)
					}
					checked++
				}
			}
			if want := (RandomLen + ChecksumLen) * (len(replacements) - 1); checked != want {
				t.Fatalf("checked %d corruptions, want %d", checked, want)
			}
		})
	}
}

func TestCheckDoesNotAllocate(t *testing.T) {
	key := mustNew(t, "sk_live", bytes.NewReader(countingBytes(RandomLen)))
	bad := key[:len(key)-1] + "0"
	if bad == key {
		bad = key[:len(key)-1] + "1"
	}
	tests := []struct {
		name   string
		key    string
		prefix string
	}{
		{"valid", key, "sk_live"},
		{"bad checksum", bad, "sk_live"},
		{"wrong prefix", key, "ks"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if allocs := testing.AllocsPerRun(100, func() { Check(tt.key, tt.prefix) }); allocs != 0 {
				t.Fatalf("Check allocates %v times per call, want 0", allocs)
			}
		})
	}
	t.Run("HasPrefix", func(t *testing.T) {
		if allocs := testing.AllocsPerRun(100, func() { HasPrefix(key, "sk_live") }); allocs != 0 {
			t.Fatalf("HasPrefix allocates %v times per call, want 0", allocs)
		}
	})
}

func TestHasPrefix(t *testing.T) {
	key := makeKey(t, "sk_live", random32)
	tests := []struct {
		name   string
		key    string
		prefix string
		want   bool
	}{
		{"own prefix", key, "sk_live", true},
		{"shorter declared prefix", key, "sk", true},
		{"only prefix and underscore", "ks_", "ks", true},
		{"garbage after prefix", "ks_!!", "ks", true},
		{"no underscore", "ksABC", "ks", false},
		{"prefix alone", "ks", "ks", false},
		{"other prefix", key, "pk", false},
		{"case differs", key, "SK_LIVE", false},
		{"prefix longer than key", "ks", "ks_live", false},
		{"empty key", "", "ks", false},
		{"empty prefix", "_abc", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := HasPrefix(tt.key, tt.prefix); got != tt.want {
				t.Fatalf("HasPrefix(%q, %q) = %v, want %v", tt.key, tt.prefix, got, tt.want)
			}
		})
	}
}

func TestParse(t *testing.T) {
	good := makeKey(t, "ks", random32)
	tests := []struct {
		name       string
		key        string
		wantPrefix string
		wantOK     bool
	}{
		{"simple", good, "ks", true},
		{"prefix with underscores", makeKey(t, "a_b_c", random32), "a_b_c", true},
		{"long prefix", makeKey(t, strings.Repeat("P", 32), random32), strings.Repeat("P", 32), true},
		{"empty", "", "", false},
		{"no underscore", "ks" + good[3:], "", false},
		{"underscore only", "_", "", false},
		{"empty prefix with valid checksum", makeKey(t, "", random32), "", false},
		{"invalid prefix with valid checksum", makeKey(t, "x-y", random32), "", false},
		{"prefix ending in underscore with valid checksum", makeKey(t, "ks_", random32), "", false},
		{"tail one short", good[:len(good)-1], "", false},
		{"tail one long", good + "0", "", false},
		{"bad checksum", good[:len(good)-1] + string(base62[(strings.IndexByte(base62, good[len(good)-1])+1)%62]), "", false},
		{"trailing underscore", good + "_", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix, ok := Parse(tt.key)
			if prefix != tt.wantPrefix || ok != tt.wantOK {
				t.Fatalf("Parse(%q) = %q, %v, want %q, %v", tt.key, prefix, ok, tt.wantPrefix, tt.wantOK)
			}
		})
	}
}

// sink keeps the compiler from discarding benchmarked calls.
var sink bool

func BenchmarkCheck(b *testing.B) {
	key := mustNew(b, "sk_live", bytes.NewReader(countingBytes(RandomLen)))
	bad := key[:len(key)-1] + "0"
	if bad == key {
		bad = key[:len(key)-1] + "1"
	}
	b.Run("valid", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			sink = Check(key, "sk_live")
		}
	})
	b.Run("bad_checksum", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			sink = Check(bad, "sk_live")
		}
	})
	b.Run("wrong_prefix", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			sink = Check(key, "pk_live")
		}
	})
}
