package apikey

import (
	"reflect"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// With the Caddy and Go this module is built with, setLogField must be
// able to skip Set. If this fails, one of them changed a layout that
// setLogField reads: it then falls back to Set, which is correct but costs
// the hot path two allocations more; update extraLogFieldsLayout or
// checkLogFieldLayouts.
func TestLogFieldLayoutKnown(t *testing.T) {
	if !fastLogFields {
		t.Fatal("ExtraLogFields or sync.Map layout not recognised; setLogField always calls Set")
	}
	var extra caddyhttp.ExtraLogFields
	if mapInited(&extra) {
		t.Fatal("a zero ExtraLogFields reads as initialized")
	}
	extra.Add(zap.String("x", "y"))
	if !mapInited(&extra) {
		t.Fatal("after Add the sync.Map still reads as uninitialized: wrong offset")
	}
}

func mapInited(extra *caddyhttp.ExtraLogFields) bool {
	e := (*extraLogFieldsLayout)(unsafe.Pointer(extra))
	return (*atomic.Uint32)(unsafe.Add(unsafe.Pointer(&e.handlers), syncMapInitedOffset)).Load() != 0
}

// setLogField leaves the same fields as Caddy's Set, whatever ran on the
// request before it.
func TestSetLogFieldMatchesSet(t *testing.T) {
	a, b := zap.String("api_key", "first"), zap.String("api_key", "second")
	other := zap.String("uuid", "u-1")
	tests := []struct {
		name   string
		before func(*caddyhttp.ExtraLogFields)
		set    []zapcore.Field
	}{
		{"fresh", func(*caddyhttp.ExtraLogFields) {}, []zapcore.Field{a}},
		{"twice replaces", func(*caddyhttp.ExtraLogFields) {}, []zapcore.Field{a, b}},
		{"after another Set", func(e *caddyhttp.ExtraLogFields) { e.Set(other) }, []zapcore.Field{a}},
		{"after Add", func(e *caddyhttp.ExtraLogFields) { e.Add(other) }, []zapcore.Field{a, b}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got, want caddyhttp.ExtraLogFields
			tc.before(&got)
			tc.before(&want)
			for _, f := range tc.set {
				setLogField(&got, f)
				want.Set(f)
			}
			if g, w := extraFields(&got), extraFields(&want); !reflect.DeepEqual(g, w) {
				t.Fatalf("fields = %v, want %v", g, w)
			}
			// With room made by the caller (setRateHeaders): the same
			// fields, and the room used only on a fresh request.
			var withSpare caddyhttp.ExtraLogFields
			tc.before(&withSpare)
			fresh := len(extraFields(&withSpare)) == 0 && !mapInited(&withSpare)
			var spare [1]zapcore.Field
			for _, f := range tc.set {
				setLogFieldIn(&withSpare, f, &spare)
			}
			g := extraFields(&withSpare)
			if w := extraFields(&want); !reflect.DeepEqual(g, w) {
				t.Fatalf("with spare: fields = %v, want %v", g, w)
			}
			if usedSpare := &g[0] == &spare[0]; usedSpare != fresh {
				t.Fatalf("spare used = %v, want %v (fresh request)", usedSpare, fresh)
			}
		})
	}
}

// On a request where a slog handler has been built from the fields (and
// cached in ExtraLogFields), setLogField drops it as Set does, so no
// handler without the new field is used afterwards.
func TestSetLogFieldDropsCachedHandlers(t *testing.T) {
	var extra caddyhttp.ExtraLogFields
	cached := &(*extraLogFieldsLayout)(unsafe.Pointer(&extra)).handlers
	cached.Store("handler", "built from the old fields")
	setLogField(&extra, zap.String("api_key", "x"))
	if _, ok := cached.Load("handler"); ok {
		t.Fatal("a handler built before the field was set is still cached")
	}
	if f := extraFields(&extra); len(f) != 1 || f[0].Key != "api_key" {
		t.Fatalf("fields = %v", f)
	}
}
