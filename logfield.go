package apikey

import (
	"reflect"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap/zapcore"
)

// setLogField sets field in the request's ExtraLogFields, which Caddy's
// server appends to the access log line.
//
// Why not just extra.Set: Set clears a sync.Map of slog handlers built from
// the fields, and on a fresh request that Clear first initializes the map
// and then replaces its root: two allocations and about a quarter of the
// handler's time, to empty a map that is empty. The map can only hold a
// stale handler once something has initialized it (a Load, Store or Clear
// all do). So while it is uninitialized (no handler was ever built and no
// other Set or Add ran on this request, which is the case unless tracing,
// log_append or the request's uuid placeholder came first) the field is
// put in place directly, as Set would; otherwise Set does it.
//
// This reads two unexported layouts, Caddy's ExtraLogFields and the Go
// runtime's sync.Map. Both are checked once at start-up (fastLogFields);
// if either differs from what is expected here, every call takes Set.
func setLogField(extra *caddyhttp.ExtraLogFields, field zapcore.Field) {
	setLogFieldIn(extra, field, nil)
}

// setLogFieldIn is setLogField with room for the field that the caller
// allocated along with something else (spare; nil for none). On a fresh
// request the fields slice is then spare, not an allocation of its own.
func setLogFieldIn(extra *caddyhttp.ExtraLogFields, field zapcore.Field, spare *[1]zapcore.Field) {
	if fastLogFields {
		e := (*extraLogFieldsLayout)(unsafe.Pointer(extra))
		if (*atomic.Uint32)(unsafe.Add(unsafe.Pointer(&e.handlers), syncMapInitedOffset)).Load() == 0 {
			for i := range e.fields {
				if e.fields[i].Key == field.Key {
					e.fields[i] = field
					return
				}
			}
			if cap(e.fields) == 0 && spare != nil {
				spare[0] = field
				e.fields = spare[:]
				return
			}
			e.fields = append(e.fields, field)
			return
		}
	}
	extra.Set(field)
}

// extraLogFieldsLayout mirrors caddyhttp.ExtraLogFields.
type extraLogFieldsLayout struct {
	fields   []zapcore.Field
	handlers sync.Map
}

// syncMapInitedOffset is where, inside a sync.Map, the uint32 lies that is
// zero until the map is first used.
var syncMapInitedOffset uintptr

// fastLogFields reports whether setLogField may skip Set.
var fastLogFields = checkLogFieldLayouts()

// checkLogFieldLayouts reports whether caddyhttp.ExtraLogFields is laid
// out as extraLogFieldsLayout and sync.Map holds its inited flag where
// setLogField reads it, and sets syncMapInitedOffset.
func checkLogFieldLayouts() bool {
	want := reflect.TypeFor[extraLogFieldsLayout]()
	got := reflect.TypeFor[caddyhttp.ExtraLogFields]()
	if got.Size() != want.Size() || got.NumField() != want.NumField() {
		return false
	}
	for i := range want.NumField() {
		g, w := got.Field(i), want.Field(i)
		if g.Name != w.Name || g.Type != w.Type || g.Offset != w.Offset {
			return false
		}
	}
	// Since Go 1.24: sync.Map{_ noCopy; m internal/sync.HashTrieMap}, and
	// the HashTrieMap starts with inited atomic.Uint32.
	sm := reflect.TypeFor[sync.Map]()
	m, ok := sm.FieldByName("m")
	if !ok || m.Type.Kind() != reflect.Struct || m.Type.NumField() == 0 {
		return false
	}
	inited := m.Type.Field(0)
	if inited.Name != "inited" || inited.Type != reflect.TypeFor[atomic.Uint32]() {
		return false
	}
	syncMapInitedOffset = m.Offset + inited.Offset
	return true
}
