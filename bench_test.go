package apikey

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/keystile/caddy-apikey/internal/quota"
)

// benchRequest is a request prepared once as Caddy's server prepares it
// (see prepare), plus what reset needs to hand it over again as new.
type benchRequest struct {
	prepared
	header   http.Header
	replTmpl caddy.Replacer
}

func newBenchRequest(srv *caddyhttp.Server, target string, header http.Header) *benchRequest {
	br := &benchRequest{prepared: prepareOn(srv, target, header), header: header}
	br.replTmpl = *br.repl
	return br
}

// reset makes the request as the server hands a new one to the first
// handler: the replacer back to the server's providers, a fresh
// ExtraLogFields (so the cost of the first log field is counted on every
// iteration, as on every real request), the key headers back in place.
// It allocates nothing, so the allocations reported are those of one
// request.
func (br *benchRequest) reset() {
	*br.repl = br.replTmpl
	*br.extra = caddyhttp.ExtraLogFields{}
	for k, v := range br.header {
		br.r.Header[k] = v
	}
}

var nopNext = caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })

// runServeHTTP times h.ServeHTTP over the requests, round robin.
func runServeHTTP(b *testing.B, h *Handler, reqs []*benchRequest, wantErr bool) {
	b.Helper()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		br := reqs[i%len(reqs)]
		br.reset()
		if err := h.ServeHTTP(br.w, br.r, nopNext); (err != nil) != wantErr {
			b.Fatalf("ServeHTTP: %v", err)
		}
	}
}

func benchRequests(n int, header func(i int) http.Header) []*benchRequest {
	return benchRequestsOn(testServer, n, header)
}

// benchRequestsOn is benchRequests for requests to the server srv.
func benchRequestsOn(srv *caddyhttp.Server, n int, header func(i int) http.Header) []*benchRequest {
	reqs := make([]*benchRequest, n)
	for i := range reqs {
		reqs[i] = newBenchRequest(srv, "/", header(i))
		// Caddy's server sets this before any handler runs.
		reqs[i].w.hdr.Set("Server", "Caddy")
	}
	return reqs
}

// BenchmarkServeHTTP is the hot path: a valid key from the cache, with a
// rate limit that never runs out, and without one.
func BenchmarkServeHTTP(b *testing.B) {
	for _, tc := range []struct {
		name string
		rate string
		hdr  http.Header
	}{
		{"bearer/rate", "1000000000/1s", http.Header{"Authorization": {"Bearer " + testKeyA}}},
		{"header/rate", "1000000000/1s", http.Header{"X-Api-Key": {testKeyA}}},
		{"header/norate", "", http.Header{"X-Api-Key": {testKeyA}}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			h := newTestHandler(b, &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: tc.rate})
			runServeHTTP(b, h, benchRequests(1, func(int) http.Header { return tc.hdr }), false)
		})
	}
}

// BenchmarkRequiredWork is the floor under BenchmarkServeHTTP: only the
// steps the hot path must take (issue 2, §3 and §5), each done with Go's
// and Caddy's own primitives, in the order the handler takes them, and
// nothing else: no guard, no lifecycle or plan, no cache checks beyond a
// hit, no counters or metrics. Its steps: find the replacer, take the key
// from its header and check it, delete the header, SHA-256, a ristretto
// hit, read the clock and decide the rate limit (rate only), set
// RateLimit-Policy and RateLimit in one allocation (rate only), name the
// key in the replacer and the vars, and set the access log field. The
// README gives the hot path as a multiple of this floor.
func BenchmarkRequiredWork(b *testing.B) {
	for _, tc := range []struct {
		name string
		rate string
	}{{"header/rate", "1000000000/1s"}, {"header/norate", ""}} {
		b.Run(tc.name, func(b *testing.B) {
			h := newTestHandler(b, &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: tc.rate})
			digest := sha256.Sum256([]byte(testKeyA))
			rec := h.inline[digest]
			h.cache.put(&digest, 0, rec, monoNow())
			h.cache.c.Wait()
			reqs := benchRequests(1, func(int) http.Header { return http.Header{"X-Api-Key": {testKeyA}} })
			limited := !h.defaultLimit.IsZero()
			b.ReportAllocs()
			for b.Loop() {
				br := reqs[0]
				br.reset()
				r := br.r
				repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
				key := r.Header["X-Api-Key"][0]
				if !validKey(key) {
					b.Fatal("key refused")
				}
				delete(r.Header, "X-Api-Key")
				d := sha256.Sum256(unsafe.Slice(unsafe.StringData(key), len(key)))
				e, ok := h.cache.c.Get(binary.LittleEndian.Uint64(d[:8]))
				if !ok || e.rec != rec {
					b.Fatal("cache miss")
				}
				var spare *[1]zapcore.Field
				if limited {
					dec := h.limiter.decide(&usageOf(rec).limit, &rec.digest, h.defaultLimit, monoNow())
					if !dec.Allowed {
						b.Fatal("denied")
					}
					spare = setRateHeaders(br.w.hdr, &h.defaultPolicy, dec, quota.Quota{}, quota.Decision{})
				}
				repl.Map(rec.provider)
				caddyhttp.SetVar(r.Context(), "http.auth.user.id", rec.idAny)
				extra := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields)
				setLogFieldIn(extra, zap.Object("api_key", (*logOK)(rec)), spare)
			}
		})
	}
}

// BenchmarkResetOnly is the cost of reset alone, which every figure above
// includes.
func BenchmarkResetOnly(b *testing.B) {
	reqs := benchRequests(1, func(int) http.Header { return http.Header{"X-Api-Key": {testKeyA}} })
	b.ReportAllocs()
	for b.Loop() {
		reqs[0].reset()
	}
}

// BenchmarkServeHTTPParallel is the hot path from all cores at once, with
// one key (one limiter state: the worst contention) and with 1000.
func BenchmarkServeHTTPParallel(b *testing.B) {
	for _, keys := range []int{1, 1000} {
		b.Run(strconv.Itoa(keys)+"keys", func(b *testing.B) {
			h := &Handler{Rate: "1000000000/1s"}
			for i := range keys {
				h.Keys = append(h.Keys, InlineKey{ID: "k" + strconv.Itoa(i), Key: testKeyA + strconv.Itoa(i)})
			}
			newTestHandler(b, h)
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				// Each goroutine has its own requests.
				reqs := benchRequests(keys, func(i int) http.Header {
					return http.Header{"X-Api-Key": {testKeyA + strconv.Itoa(i)}}
				})
				for i := 0; pb.Next(); i++ {
					br := reqs[i%keys]
					br.reset()
					if err := h.ServeHTTP(br.w, br.r, nopNext); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkServeHTTPInvalid is a flood of unknown keys (a cache miss and a
// lookup in the inline keys: unknown keys are not cached with the keys in
// memory), and of malformed ones (no lookup at all).
func BenchmarkServeHTTPInvalid(b *testing.B) {
	// The brute-force guard would soon answer for these, from one
	// address: what is measured here is the rejection itself.
	h := newTestHandler(b, &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: "1000000000/1s", MaxFailures: "off"})
	b.Run("unknown", func(b *testing.B) {
		runServeHTTP(b, h, benchRequests(100, func(i int) http.Header {
			return http.Header{"X-Api-Key": {"unknown-key-" + strconv.Itoa(i)}}
		}), true)
	})
	b.Run("malformed", func(b *testing.B) {
		runServeHTTP(b, h, benchRequests(1, func(int) http.Header {
			return http.Header{"X-Api-Key": {"bad\x01key"}}
		}), true)
	})
	// On a server without handle_errors the handler writes the 401 itself
	// (no error value, no error id); Caddy's error path, which that spares,
	// is not part of any of these figures.
	b.Run("unknown-no-error-routes", func(b *testing.B) {
		runServeHTTP(b, h, benchRequestsOn(&caddyhttp.Server{}, 100, func(i int) http.Header {
			return http.Header{"X-Api-Key": {"unknown-key-" + strconv.Itoa(i)}}
		}), false)
	})
}

// BenchmarkServeHTTPMiss is a valid key looked up in the key set every
// time: the cache never keeps anything (its TTL is negative).
func BenchmarkServeHTTPMiss(b *testing.B) {
	h := newTestHandler(b, &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}})
	h.cache.ttl = -1
	runServeHTTP(b, h, benchRequests(1, func(int) http.Header { return http.Header{"X-Api-Key": {testKeyA}} }), false)
}

// BenchmarkLimiterDecide is one limiter decision alone: with the key's
// state held from the request before, as the request path holds it on the
// key's usage record, and found in the limiter's map.
func BenchmarkLimiterDecide(b *testing.B) {
	h := newTestHandler(b, &Handler{Keys: []InlineKey{{ID: "alpha", Key: testKeyA}}, Rate: "1000000000/1s"})
	digest := sha256.Sum256([]byte(testKeyA))
	for _, tc := range []struct {
		name string
		held *atomic.Pointer[limitState]
	}{{"held", new(atomic.Pointer[limitState])}, {"map", nil}} {
		b.Run(tc.name, func(b *testing.B) {
			// As on the request path: no clock of its own, the
			// request's reading handed in.
			l := newLimiter(nil)
			now := monoNow()
			b.ReportAllocs()
			for b.Loop() {
				// One interval on: every request is admitted and
				// written, however long the run.
				now += int64(h.defaultLimit.Interval())
				if !l.decide(tc.held, &digest, h.defaultLimit, now).Allowed {
					b.Fatal("denied")
				}
			}
		})
	}
}

// BenchmarkLogField is setting the access log field on a fresh request:
// Caddy's ExtraLogFields.Set (which clears, and so creates, its sync.Map),
// beside setLogField, which the handler uses.
func BenchmarkLogField(b *testing.B) {
	rec := newKeyRecord(&keyRecord{id: "alpha"})
	for _, tc := range []struct {
		name string
		set  func(*caddyhttp.ExtraLogFields, zapcore.Field)
	}{
		{"caddy-set", (*caddyhttp.ExtraLogFields).Set},
		{"setLogField", setLogField},
	} {
		b.Run(tc.name, func(b *testing.B) {
			reqs := benchRequests(1, func(int) http.Header { return nil })
			b.ReportAllocs()
			for b.Loop() {
				reqs[0].reset()
				tc.set(reqs[0].extra, zap.Object("api_key", (*logOK)(rec)))
			}
		})
	}
}

// BenchmarkCacheHit is one lookup that the ristretto cache answers, with
// the checks keyCache adds (use count, generation, whole digest).
func BenchmarkCacheHit(b *testing.B) {
	kc, err := newKeyCache(1000, time.Hour, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(kc.close)
	digest := sha256.Sum256([]byte(testKeyA))
	rec := newKeyRecord(&keyRecord{id: "alpha"})
	kc.put(&digest, 0, rec, 1)
	kc.c.Wait()
	b.ReportAllocs()
	for b.Loop() {
		if got, ok := kc.get(&digest, 0, 1); !ok || got != rec {
			b.Fatal("cache miss")
		}
	}
}

// BenchmarkSHA256Key is the yardstick: one SHA-256 of a 64-byte key, the
// least any check of a hashed key costs. The README gives the hot path as
// a multiple of it, which travels between machines better than ns/op.
func BenchmarkSHA256Key(b *testing.B) {
	b.ReportAllocs()
	key := []byte(testKeyA)
	for b.Loop() {
		_ = sha256.Sum256(key)
	}
}

// benchKeys1M is a keys file of a million entries, made once per test
// binary: key "bench-<i>" has id "k<i>", as bench/genkeys writes them.
var benchKeys1M = sync.OnceValue(func() []byte { return benchKeysFile(1_000_000) })

func benchKeyPlain(i int) string { return "bench-" + strconv.Itoa(i) + "-0123456789abcdefghijklmnop" }

func benchKeysFile(n int) []byte {
	var buf bytes.Buffer
	buf.Grow(n * 100)
	buf.WriteString(`{"keys": [` + "\n")
	var hx [64]byte
	for i := range n {
		sum := sha256.Sum256([]byte(benchKeyPlain(i)))
		hex.Encode(hx[:], sum[:])
		if i > 0 {
			buf.WriteString(",\n")
		}
		buf.WriteString(`{"id": "k` + strconv.Itoa(i) + `", "hash": "sha256:`)
		buf.Write(hx[:])
		buf.WriteString(`"}`)
	}
	buf.WriteString("\n]}\n")
	return buf.Bytes()
}

// BenchmarkLoadKeysFile1M parses a keys file of a million entries, as a
// load or reload does. Besides time and allocations per load it reports
// B/key: the live heap the loaded set holds per key (HeapAlloc after a
// GC, less before), which is what the set costs in resident memory.
func BenchmarkLoadKeysFile1M(b *testing.B) {
	data := benchKeys1M()
	const n = 1_000_000
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	var perKey float64
	var ms runtime.MemStats
	for b.Loop() {
		b.StopTimer()
		runtime.GC()
		runtime.ReadMemStats(&ms)
		before := ms.HeapAlloc
		b.StartTimer()
		set, err := parseKeysFile(data)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if set.len() != n {
			b.Fatalf("loaded %d keys, want %d", set.len(), n)
		}
		runtime.GC()
		runtime.ReadMemStats(&ms)
		perKey = float64(int64(ms.HeapAlloc)-int64(before)) / n
		runtime.KeepAlive(set)
		b.StartTimer()
	}
	b.ReportMetric(perKey, "B/key")
}

// benchKeys1MPlus is benchKeys1M with one key more, as a reload finds it.
var benchKeys1MPlus = sync.OnceValue(func() []byte {
	data := benchKeys1M()
	end := bytes.LastIndex(data, []byte("\n]}")) // after the last entry
	sum := sha256.Sum256([]byte("bench-extra"))
	extra := `,
{"id": "extra", "hash": "sha256:` + hex.EncodeToString(sum[:]) + `"}`
	return slices.Concat(data[:end], []byte(extra), data[end:])
})

// BenchmarkReloadKeysFile1M is what a reload of the 1M keys file costs
// when one key was added: the new version read over the set in use
// (reparseKeysFile, which keeps the records of unchanged keys and counts
// the keys added and removed). B/op is the garbage it leaves, less the new
// set's map and records.
func BenchmarkReloadKeysFile1M(b *testing.B) {
	data, plus := benchKeys1M(), benchKeys1MPlus()
	b.ReportAllocs()
	b.SetBytes(int64(len(plus)))
	for b.Loop() {
		b.StopTimer()
		old, err := parseKeysFile(data)
		if err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		b.StartTimer()
		set, added, removed, err := reparseKeysFile(plus, old)
		if err != nil {
			b.Fatal(err)
		}
		if set.len() != 1_000_001 || added != 1 || removed != 0 {
			b.Fatalf("reloaded %d keys, %d added, %d removed; want 1000001, 1, 0", set.len(), added, removed)
		}
	}
}

// BenchmarkServeHTTPKeysFile is the hot path with a keys file of 1,000
// and of 1,000,000 keys: the same 1,000 valid keys (spread over the set),
// cache hits, a rate limit that never runs out. The two differ only in the
// set's size, so their ratio is what a million keys cost per request
// (mostly the garbage collector marking the larger heap).
func BenchmarkServeHTTPKeysFile(b *testing.B) {
	for _, tc := range []struct {
		name   string
		n      int
		stride int
		data   func() []byte
	}{
		{"1k", 1000, 1, func() []byte { return benchKeysFile(1000) }},
		{"1M", 1_000_000, 997, benchKeys1M},
	} {
		b.Run(tc.name, func(b *testing.B) {
			// The watcher would read the file again during the timed loop
			// (it was written just now): its allocations are not the
			// request's.
			slowPolling(b)
			path := filepath.Join(b.TempDir(), "keys.json")
			if err := os.WriteFile(path, tc.data(), 0o600); err != nil {
				b.Fatal(err)
			}
			h := newTestHandler(b, &Handler{KeysFile: path, Rate: "1000000000/1s"})
			reqs := benchRequests(1000, func(i int) http.Header {
				return http.Header{"X-Api-Key": {benchKeyPlain(i * tc.stride % tc.n)}}
			})
			// Each key looked up once, so that the cache holds them all.
			for _, br := range reqs {
				br.reset()
				if err := h.ServeHTTP(br.w, br.r, nopNext); err != nil {
					b.Fatalf("warming the cache: %v", err)
				}
			}
			h.cache.c.Wait()
			runtime.GC()
			runServeHTTP(b, h, reqs, false)
		})
	}
}
