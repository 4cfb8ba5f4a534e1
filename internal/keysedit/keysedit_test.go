package keysedit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

var (
	hashA = "sha256:" + strings.Repeat("a1", 32)
	hashB = "sha256:" + strings.Repeat("b2", 32)
	hashC = "sha256:" + strings.Repeat("c3", 32)
)

// Entries with the spacing and member order of a hand-edited file, which
// an edit of another entry must not disturb.
var (
	entryA = `{ "id" :"acme-prod",   "hash":"` + hashA + `" ,"name": "Acme production","metadata":{"tier":"gold", "b":"x"}}`
	entryB = `{"hash": "` + hashB + `", "id": "beta", "rate": "100/1m", "burst": 20}`
	entryC = "{\n    \"id\": \"gamma\",\n    \"hash\": \"" + hashC + "\",\n    \"allow_ips\": [\"10.0.0.0/8\"]\n  }"
)

// canonical is a file in the layout Save writes.
func canonical(entries ...string) string {
	if len(entries) == 0 {
		return "{\"keys\": []}\n"
	}
	return "{\"keys\": [\n  " + strings.Join(entries, ",\n  ") + "\n]}\n"
}

func writeFile(t *testing.T, dir, name, content string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	// WriteFile's mode passes through the umask; the tests want it exact.
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func mustLoad(t *testing.T, path string) *File {
	t.Helper()
	f, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return f
}

// assertNoTemps fails if Save left a temporary file in dir.
func assertNoTemps(t *testing.T, dir string) {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range des {
		if strings.Contains(de.Name(), ".tmp-") {
			t.Errorf("temporary file %s left in %s", de.Name(), dir)
		}
	}
}

func assertEntries(t *testing.T, f *File, want ...string) {
	t.Helper()
	got := f.Entries()
	if len(got) != len(want) {
		t.Fatalf("got %d entries, want %d: %q", len(got), len(want), got)
	}
	for i := range want {
		if string(got[i]) != want[i] {
			t.Errorf("entry %d:\n got %s\nwant %s", i, got[i], want[i])
		}
	}
}

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		content string
		// same says whether Save must write content back unchanged,
		// which it can only do for a file already in its layout.
		same bool
	}{
		{"canonical", canonical(entryA, entryB, entryC), true},
		{"canonical empty", canonical(), true},
		{"one line", `{"keys":[` + entryA + `,` + entryB + `,` + entryC + `]}`, false},
		{"spread out", "\n{ \"keys\" :\n[\n\n\t" + entryA + "\n\t,\n" + entryB + " , " + entryC + "\n\n]\n}\n\n", false},
		{"empty array spaced", "{ \"keys\" : [ ] }", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := writeFile(t, dir, "keys.json", tt.content, 0o600)
			f := mustLoad(t, path)
			var want []string
			if !strings.Contains(tt.content, `"keys": []`) && !strings.Contains(tt.content, "[ ]") {
				want = []string{entryA, entryB, entryC}
			}
			assertEntries(t, f, want...)
			if err := f.Save(); err != nil {
				t.Fatalf("Save: %v", err)
			}
			got := readFile(t, path)
			if tt.same && got != tt.content {
				t.Errorf("Save changed the file:\n got %q\nwant %q", got, tt.content)
			}
			if got != canonical(want...) {
				t.Errorf("saved\n%s\nwant\n%s", got, canonical(want...))
			}
			assertEntries(t, mustLoad(t, path), want...)
			assertNoTemps(t, dir)
		})
	}
}

func TestAccessors(t *testing.T) {
	path := writeFile(t, t.TempDir(), "keys.json", canonical(entryA, entryB, entryC), 0o600)
	f := mustLoad(t, path)
	if f.Path() != path {
		t.Errorf("Path() = %q, want %q", f.Path(), path)
	}
	if f.Len() != 3 {
		t.Errorf("Len() = %d, want 3", f.Len())
	}
	if got, want := fmt.Sprint(f.IDs()), "[acme-prod beta gamma]"; got != want {
		t.Errorf("IDs() = %s, want %s", got, want)
	}
	if raw, ok := f.Entry("beta"); !ok || string(raw) != entryB {
		t.Errorf("Entry(beta) = %s, %v; want %s, true", raw, ok, entryB)
	}
	if raw, ok := f.Entry("nope"); ok || raw != nil {
		t.Errorf("Entry(nope) = %s, %v; want nil, false", raw, ok)
	}
	// Writing into what Entry and Entries return must not reach the file.
	raw, _ := f.Entry("beta")
	raw[0] = 'X'
	f.Entries()[0][0] = 'X'
	assertEntries(t, f, entryA, entryB, entryC)
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    string
	}{
		{"empty", "", "file is empty"},
		{"only space", " \n\t", "file is empty"},
		{"array", `[]`, `expected a JSON object {"keys": [...]}, found [`},
		{"string", `"keys"`, `expected a JSON object`},
		{"extra top-level field", `{"keys": [], "version": 2}`, `unknown top-level field "version"`},
		{"extra field first", `{"comment": "x", "keys": []}`, `unknown top-level field "comment"`},
		{"no keys", `{}`, `no "keys" array`},
		{"keys twice", `{"keys": [], "keys": []}`, `"keys" appears twice`},
		{"keys not an array", `{"keys": {}}`, `expected an array after "keys", found {`},
		{"keys null", `{"keys": null}`, `expected an array after "keys"`},
		{"entry not an object", `{"keys": [` + entryA + `, 42]}`, `keys[1]: entry must be a JSON object, not a number`},
		{"entry an array", `{"keys": [[]]}`, `keys[0]: entry must be a JSON object, not an array`},
		{"entry without id", `{"keys": [` + entryA + `, {"hash": "` + hashB + `"}]}`, `keys[1]: missing "id"`},
		{"id not a string", `{"keys": [{"id": 7}]}`, `keys[0]: "id" must be a string, not a number`},
		{"id empty", `{"keys": [{"id": ""}]}`, `keys[0]: "id" is empty`},
		{"duplicate id", `{"keys": [` + entryA + `, ` + entryB + `, {"id": "acme-prod"}]}`, `keys[2] (id "acme-prod"): duplicate id (also keys[0])`},
		{"truncated in an entry", `{"keys": [` + entryA + `, {"id": "b`, `keys[1]: unexpected end of file (truncated JSON?)`},
		{"truncated after an entry", `{"keys": [` + entryA, `unexpected end of file (truncated JSON?)`},
		{"truncated at the end", `{"keys": []`, `unexpected end of file (truncated JSON?)`},
		{"bad syntax in an entry", "{\"keys\": [\n" + `{"id": "a",, "hash": "x"}]}`, `keys[0]: invalid JSON at line 2, column`},
		{"data after the end", `{"keys": []} {}`, `unexpected data after the closing }`},
		{"member twice", `{"keys": [` + entryA + `, {"id": "e", "disabled": true, "name": "E", "disabled": false}]}`,
			`keys[1] (id "e"): "disabled" appears twice`},
		{"member twice in another case", `{"keys": [{"ID": "e", "Disabled": true, "disabled": false}]}`,
			`keys[0] (id "e"): "disabled" appears twice (as "Disabled" and "disabled")`},
		{"member twice, folded as the server folds", `{"keys": [{"id": "e", "hash": "` + hashA + `", "haſh": "` + hashB + `"}]}`,
			`keys[0] (id "e"): "hash" appears twice (as "hash" and "haſh")`},
		{"id twice", `{"keys": [{"id": "e", "id": "f"}]}`, `keys[0] (id "f"): "id" appears twice`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeFile(t, t.TempDir(), "keys.json", tt.content, 0o600)
			for _, load := range []func(string) (*File, error){Load, LoadOrNew} {
				f, err := load(path)
				if err == nil {
					t.Fatalf("loaded %d entries, want an error containing %q", f.Len(), tt.want)
				}
				msg := err.Error()
				if !strings.Contains(msg, tt.want) || !strings.Contains(msg, "loading keys file "+path+": ") {
					t.Errorf("error %q, want it to name the file and contain %q", msg, tt.want)
				}
			}
		})
	}
}

func TestLoadMissing(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keys.json")
	if _, err := Load(path); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), path) {
		t.Errorf("Load of a missing file: error %v, want one naming the file and wrapping os.ErrNotExist", err)
	}
	f, err := LoadOrNew(path)
	if err != nil {
		t.Fatalf("LoadOrNew: %v", err)
	}
	if f.Len() != 0 {
		t.Errorf("LoadOrNew of a missing file has %d entries, want 0", f.Len())
	}
	if err := f.Save(); err != nil {
		t.Fatalf("Save: %v", err)
	}
	if got := readFile(t, path); got != "{\"keys\": []}\n" {
		t.Errorf("new empty file is %q", got)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("new file has mode %v, want 0600", fi.Mode().Perm())
	}
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("Load of a directory: error %v, want \"not a regular file\"", err)
	}
}

func TestAdd(t *testing.T) {
	tests := []struct {
		name    string
		entry   string
		want    string // error; "" for success
		notWant string // what the error must not contain
	}{
		{"appends", `{"id": "delta", "hash": "sha256:` + strings.Repeat("d4", 32) + `", "name": "Delta"}`, "", ""},
		{"appends, trimmed", " \n{\"id\":\"delta\"}\n ", "", ""},
		{"duplicate id", `{"id": "beta", "hash": "sha256:` + strings.Repeat("d4", 32) + `"}`, `a key with id "beta" is already in the file`, ""},
		{"duplicate hash", `{"id": "delta", "hash": "` + hashB + `"}`, `adding key "delta": key "beta" already has the same hash`, strings.Repeat("b2", 32)},
		{"duplicate hash, other case", `{"id": "delta", "hash": "` + strings.ToUpper(hashC) + `"}`, `key "gamma" already has the same hash`, strings.Repeat("c3", 32)},
		{"not an object", `["delta"]`, `entry must be a JSON object, not an array`, ""},
		{"no id", `{"hash": "sha256:` + strings.Repeat("d4", 32) + `"}`, `missing "id"`, ""},
		{"id not a string", `{"id": ["delta"]}`, `"id" must be a string`, ""},
		{"not JSON", `{"id": "delta"`, `not valid JSON`, ""},
		{"empty", ``, `not valid JSON`, ""},
		{"member twice", `{"id": "delta", "disabled": true, "DISABLED": false}`, `adding key: "disabled" appears twice (as "disabled" and "DISABLED")`, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			before := canonical(entryA, entryB, entryC)
			path := writeFile(t, dir, "keys.json", before, 0o600)
			f := mustLoad(t, path)
			err := f.Add(json.RawMessage(tt.entry))
			if tt.want != "" {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Add error %v, want one containing %q", err, tt.want)
				}
				if tt.notWant != "" && strings.Contains(err.Error(), tt.notWant) {
					t.Errorf("Add error %q quotes the hash", err)
				}
				assertEntries(t, f, entryA, entryB, entryC)
				if err := f.Save(); err != nil {
					t.Fatalf("Save: %v", err)
				}
				if got := readFile(t, path); got != before {
					t.Errorf("refused Add changed the file:\n%s", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("Add: %v", err)
			}
			added := strings.TrimSpace(tt.entry)
			if err := f.Save(); err != nil {
				t.Fatalf("Save: %v", err)
			}
			if got, want := readFile(t, path), canonical(entryA, entryB, entryC, added); got != want {
				t.Errorf("after Add the file is\n%s\nwant\n%s", got, want)
			}
			if got := fmt.Sprint(mustLoad(t, path).IDs()); got != "[acme-prod beta gamma delta]" {
				t.Errorf("IDs after Add = %s", got)
			}
		})
	}
}

func TestSet(t *testing.T) {
	tests := []struct {
		name  string
		entry string // the entry edited, id "e"
		field string
		value any
		want  string // the entry after, or the error
		fails bool
	}{
		{"change a value", `{"id": "e",  "disabled" :false , "name": "E"}`, "disabled", true,
			`{"id": "e",  "disabled" :true , "name": "E"}`, false},
		{"change an object value", `{"id":"e","metadata":{"a":"1"},"rate":"1/s"}`, "metadata", map[string]string{"tier": "<gold>"},
			`{"id":"e","metadata":{"tier":"<gold>"},"rate":"1/s"}`, false},
		{"add a field, spaced like the last", `{"id": "e" ,  "hash" :  "` + hashC + `"}`, "disabled", true,
			`{"id": "e" ,  "hash" :  "` + hashC + `" ,  "disabled" :  true}`, false},
		{"other field of a key with a duplicate hash", `{"id": "e", "hash": "` + hashA + `"}`, "disabled", true,
			`{"id": "e", "hash": "` + hashA + `", "disabled": true}`, false},
		{"same hash in another case", `{"id": "e", "hash": "` + hashC + `"}`, "hash", strings.ToUpper(hashC),
			`{"id": "e", "hash": "` + strings.ToUpper(hashC) + `"}`, false},
		{"add to a one-member entry", `{ "id":"e" }`, "burst", 20,
			`{ "id":"e", "burst":20 }`, false},
		{"add to a multi-line entry", "{\n    \"id\": \"e\",\n    \"name\": \"E\"\n  }", "allow_methods", []string{"GET"},
			"{\n    \"id\": \"e\",\n    \"name\": \"E\",\n    \"allow_methods\": [\"GET\"]\n  }", false},
		{"add a raw value", `{"id": "e", "name": "E"}`, "expires", json.RawMessage(` "2027-01-01T00:00:00Z" `),
			`{"id": "e", "name": "E", "expires": "2027-01-01T00:00:00Z"}`, false},
		{"delete a middle field", `{"id": "e", "disabled": true, "name": "E"}`, "disabled", nil,
			`{"id": "e", "name": "E"}`, false},
		{"delete the first field", `{"disabled": true, "id": "e", "name": "E"}`, "disabled", nil,
			`{"id": "e", "name": "E"}`, false},
		{"delete the last field", "{\n  \"id\": \"e\",\n  \"disabled\": true\n}", "disabled", nil,
			"{\n  \"id\": \"e\"\n}", false},
		{"delete an absent field", `{"id": "e", "name": "E"}`, "disabled", nil,
			`{"id": "e", "name": "E"}`, false},
		{"escaped names and strings", `{"i\u0064": "e", "note": "a \"}\" b", "na\"me": "x"}`, "name", "y",
			`{"i\u0064": "e", "note": "a \"}\" b", "na\"me": "x", "name": "y"}`, false},
		{"rename", `{"id": "e", "name": "E"}`, "id", "e2",
			`{"id": "e2", "name": "E"}`, false},
		{"rename to a taken id", `{"id": "e"}`, "id", "beta",
			`a key with id "beta" is already in the file`, true},
		{"take another key's hash", `{"id": "e", "hash": "` + hashC + `"}`, "hash", strings.ToUpper(hashB),
			`key "beta" already has the same hash`, true},
		{"delete the id", `{"id": "e", "name": "E"}`, "id", nil,
			`missing "id"`, true},
		{"make the id a number", `{"id": "e"}`, "id", 3,
			`"id" must be a string`, true},
		{"value JSON cannot encode", `{"id": "e"}`, "rate", func() {},
			`encoding the value`, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeFile(t, t.TempDir(), "keys.json", canonical(entryA, entryB, tt.entry), 0o600)
			f := mustLoad(t, path)
			err := f.Set("e", tt.field, tt.value)
			if tt.fails {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Set error %v, want one containing %q", err, tt.want)
				}
				if strings.Contains(err.Error(), strings.Repeat("b2", 32)) {
					t.Errorf("Set error %q quotes a hash", err)
				}
				assertEntries(t, f, entryA, entryB, tt.entry)
				return
			}
			if err != nil {
				t.Fatalf("Set: %v", err)
			}
			if err := f.Save(); err != nil {
				t.Fatalf("Save: %v", err)
			}
			if got, want := readFile(t, path), canonical(entryA, entryB, tt.want); got != want {
				t.Errorf("after Set the file is\n%s\nwant\n%s", got, want)
			}
			if !json.Valid([]byte(tt.want)) {
				t.Errorf("test's want is not JSON: %s", tt.want)
			}
		})
	}
}

func TestSetAndRemoveUnknownID(t *testing.T) {
	path := writeFile(t, t.TempDir(), "keys.json", canonical(entryA, entryB), 0o600)
	f := mustLoad(t, path)
	ops := []struct {
		name string
		do   func() error
	}{
		{"set", func() error { return f.Set("nope", "disabled", true) }},
		{"remove", func() error { return f.Remove("nope") }},
		{"set, id differs in case", func() error { return f.Set("BETA", "disabled", true) }},
	}
	for _, op := range ops {
		t.Run(op.name, func(t *testing.T) {
			err := op.do()
			if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `no key with id "`) {
				t.Errorf("error %v, want `no key with id ...` wrapping ErrNotFound", err)
			}
			assertEntries(t, f, entryA, entryB)
		})
	}
}

func TestRemove(t *testing.T) {
	tests := []struct {
		id   string
		want []string
	}{
		{"acme-prod", []string{entryB, entryC}},
		{"beta", []string{entryA, entryC}},
		{"gamma", []string{entryA, entryB}},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			path := writeFile(t, t.TempDir(), "keys.json", canonical(entryA, entryB, entryC), 0o600)
			f := mustLoad(t, path)
			if err := f.Remove(tt.id); err != nil {
				t.Fatalf("Remove: %v", err)
			}
			if err := f.Save(); err != nil {
				t.Fatalf("Save: %v", err)
			}
			if got, want := readFile(t, path), canonical(tt.want...); got != want {
				t.Errorf("after Remove the file is\n%s\nwant\n%s", got, want)
			}
		})
	}
	t.Run("all", func(t *testing.T) {
		path := writeFile(t, t.TempDir(), "keys.json", canonical(entryA, entryB), 0o600)
		f := mustLoad(t, path)
		for _, id := range f.IDs() {
			if err := f.Remove(id); err != nil {
				t.Fatalf("Remove(%q): %v", id, err)
			}
		}
		if err := f.Save(); err != nil {
			t.Fatalf("Save: %v", err)
		}
		if got := readFile(t, path); got != "{\"keys\": []}\n" {
			t.Errorf("after removing every key the file is %q", got)
		}
	})
}

// TestSaveRefusesChangedFile is the lost-update guard: someone else's
// write between Load and Save must survive the Save.
func TestSaveRefusesChangedFile(t *testing.T) {
	other := canonical(entryC)
	tests := []struct {
		name    string
		initial string // "" for no file
		change  func(t *testing.T, path string)
		want    string // what the file must hold after; "" for no file
	}{
		{"edited", canonical(entryA, entryB), func(t *testing.T, path string) {
			writeFile(t, filepath.Dir(path), filepath.Base(path), other, 0o600)
		}, other},
		{"edited to the same length", canonical(entryA), func(t *testing.T, path string) {
			writeFile(t, filepath.Dir(path), filepath.Base(path), strings.Replace(canonical(entryA), "acme-prod", "acme-test", 1), 0o600)
		}, strings.Replace(canonical(entryA), "acme-prod", "acme-test", 1)},
		{"removed", canonical(entryA), func(t *testing.T, path string) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
		}, ""},
		{"created while missing", "", func(t *testing.T, path string) {
			writeFile(t, filepath.Dir(path), filepath.Base(path), other, 0o600)
		}, other},
		{"dangling symlink created while missing", "", func(t *testing.T, path string) {
			if err := os.Symlink("elsewhere.json", path); err != nil {
				t.Fatal(err)
			}
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "keys.json")
			if tt.initial != "" {
				writeFile(t, dir, "keys.json", tt.initial, 0o600)
			}
			f, err := LoadOrNew(path)
			if err != nil {
				t.Fatalf("LoadOrNew: %v", err)
			}
			if err := f.Add(json.RawMessage(`{"id": "new"}`)); err != nil {
				t.Fatal(err)
			}
			tt.change(t, path)
			err = f.Save()
			if !errors.Is(err, ErrChanged) || !strings.Contains(err.Error(), "changed since it was read; run the command again") {
				t.Fatalf("Save error %v, want ErrChanged", err)
			}
			data, rerr := os.ReadFile(path)
			switch {
			case tt.want == "" && rerr == nil:
				t.Errorf("file exists after a refused Save: %q", data)
			case tt.want != "" && string(data) != tt.want:
				t.Errorf("refused Save left %q (%v), want the other writer's %q", data, rerr, tt.want)
			}
			if fi, err := os.Lstat(path); tt.name == "dangling symlink created while missing" && (err != nil || fi.Mode()&os.ModeSymlink == 0) {
				t.Errorf("the symlink was replaced (%v, %v)", fi, err)
			}
			assertNoTemps(t, dir)
		})
	}
}

func TestSaveAgain(t *testing.T) {
	path := writeFile(t, t.TempDir(), "keys.json", canonical(entryA), 0o600)
	f := mustLoad(t, path)
	for i, id := range []string{"one", "two"} {
		if err := f.Add(json.RawMessage(`{"id": "` + id + `"}`)); err != nil {
			t.Fatal(err)
		}
		// The first Save's own write must not count as someone else's.
		if err := f.Save(); err != nil {
			t.Fatalf("Save %d: %v", i+1, err)
		}
	}
	if got, want := readFile(t, path), canonical(entryA, `{"id": "one"}`, `{"id": "two"}`); got != want {
		t.Errorf("file is\n%s\nwant\n%s", got, want)
	}
}

// TestSaveFailure checks that a Save that fails leaves the original file
// as it was and no temporary file behind, and that it can be retried.
func TestSaveFailure(t *testing.T) {
	original := canonical(entryA, entryB)
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) // after Load, before Save
		want  string
	}{
		{"read-only directory", func(t *testing.T, dir string) {
			if os.Geteuid() == 0 {
				t.Skip("root ignores directory permissions")
			}
			if err := os.Chmod(dir, 0o555); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Chmod(dir, 0o755) })
		}, "creating a temporary file"},
		{"rename fails", func(t *testing.T, dir string) {
			rename = func(string, string) error { return errors.New("injected failure") }
			t.Cleanup(func() { rename = os.Rename })
		}, "renaming"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := writeFile(t, dir, "keys.json", original, 0o640)
			f := mustLoad(t, path)
			if err := f.Set("beta", "disabled", true); err != nil {
				t.Fatal(err)
			}
			tt.setup(t, dir)
			err := f.Save()
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "saving keys file "+path) {
				t.Fatalf("Save error %v, want one naming the file and containing %q", err, tt.want)
			}
			if got := readFile(t, path); got != original {
				t.Errorf("failed Save changed the file to %q", got)
			}
			assertNoTemps(t, dir)
		})
	}
	t.Run("directory removed", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "gone")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		f, err := LoadOrNew(filepath.Join(dir, "keys.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(dir); err != nil {
			t.Fatal(err)
		}
		if err := f.Save(); err == nil || !strings.Contains(err.Error(), "creating a temporary file") {
			t.Fatalf("Save error %v, want one about the temporary file", err)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("directory is back after a failed Save: %v", err)
		}
	})
}

func TestSaveKeepsMode(t *testing.T) {
	for _, mode := range []os.FileMode{0o640, 0o600, 0o644, 0o400} {
		t.Run(fmt.Sprintf("%#o", mode), func(t *testing.T) {
			path := writeFile(t, t.TempDir(), "keys.json", canonical(entryA), mode)
			f := mustLoad(t, path)
			if err := f.Remove("acme-prod"); err != nil {
				t.Fatal(err)
			}
			if err := f.Save(); err != nil {
				t.Fatalf("Save: %v", err)
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode() != mode {
				t.Errorf("mode after Save = %v, want %v", fi.Mode(), mode)
			}
		})
	}
}

func TestSymlink(t *testing.T) {
	t.Run("edits the target", func(t *testing.T) {
		linkDir, targetDir := t.TempDir(), t.TempDir()
		target := writeFile(t, targetDir, "real.json", canonical(entryA, entryB), 0o640)
		link := filepath.Join(linkDir, "keys.json")
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		f := mustLoad(t, link)
		if f.Path() != link {
			t.Errorf("Path() = %q, want the link %q", f.Path(), link)
		}
		if err := f.Remove("acme-prod"); err != nil {
			t.Fatal(err)
		}
		if err := f.Save(); err != nil {
			t.Fatalf("Save: %v", err)
		}
		fi, err := os.Lstat(link)
		if err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Fatalf("after Save %s is no longer a symlink (%v, %v)", link, fi, err)
		}
		if got, want := readFile(t, target), canonical(entryB); got != want {
			t.Errorf("target after Save is\n%s\nwant\n%s", got, want)
		}
		if fi, err := os.Stat(target); err != nil || fi.Mode() != 0o640 {
			t.Errorf("target mode after Save = %v (%v), want 0640", fi.Mode(), err)
		}
		assertNoTemps(t, linkDir)
		assertNoTemps(t, targetDir)
	})
	t.Run("relative link through a chain", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, dir, "real.json", canonical(entryA), 0o600)
		if err := os.Symlink("real.json", filepath.Join(dir, "mid.json")); err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(dir, "keys.json")
		if err := os.Symlink("mid.json", link); err != nil {
			t.Fatal(err)
		}
		f := mustLoad(t, link)
		if err := f.Set("acme-prod", "disabled", true); err != nil {
			t.Fatal(err)
		}
		if err := f.Save(); err != nil {
			t.Fatalf("Save: %v", err)
		}
		for _, name := range []string{"keys.json", "mid.json"} {
			if fi, err := os.Lstat(filepath.Join(dir, name)); err != nil || fi.Mode()&os.ModeSymlink == 0 {
				t.Errorf("%s is no longer a symlink", name)
			}
		}
		if got := readFile(t, filepath.Join(dir, "real.json")); !strings.Contains(got, `"b":"x"},"disabled":true}`) {
			t.Errorf("real.json after Save: %s", got)
		}
	})
	t.Run("repointed between Load and Save", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, dir, "a.json", canonical(entryA), 0o600)
		writeFile(t, dir, "b.json", canonical(entryA), 0o600)
		link := filepath.Join(dir, "keys.json")
		if err := os.Symlink("a.json", link); err != nil {
			t.Fatal(err)
		}
		f := mustLoad(t, link)
		if err := f.Remove("acme-prod"); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(link); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("b.json", link); err != nil {
			t.Fatal(err)
		}
		if err := f.Save(); !errors.Is(err, ErrChanged) {
			t.Errorf("Save error %v, want ErrChanged", err)
		}
		for _, name := range []string{"a.json", "b.json"} {
			if got := readFile(t, filepath.Join(dir, name)); got != canonical(entryA) {
				t.Errorf("%s changed to %q", name, got)
			}
		}
	})
	t.Run("dangling", func(t *testing.T) {
		dir := t.TempDir()
		link := filepath.Join(dir, "keys.json")
		if err := os.Symlink("missing.json", link); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadOrNew(link); err == nil || !strings.Contains(err.Error(), "symlink to a file that does not exist") {
			t.Errorf("LoadOrNew error %v, want one about the dangling symlink", err)
		}
		if _, err := Load(link); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Load error %v, want os.ErrNotExist", err)
		}
	})
}

// TestConcurrentReader polls the file the way the server does while it is
// saved 200 times: every read must be a whole file, old or new.
func TestConcurrentReader(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "keys.json", canonical(entryA, entryB, entryC), 0o600)
	f := mustLoad(t, path)

	var stop atomic.Bool
	var reads, bad atomic.Int64
	var firstBad atomic.Value
	var wg sync.WaitGroup
	wg.Go(func() {
		for !stop.Load() {
			data, err := os.ReadFile(path)
			reads.Add(1)
			var doc struct {
				Keys []json.RawMessage `json:"keys"`
			}
			if err == nil {
				err = json.Unmarshal(data, &doc)
			}
			if err == nil && (doc.Keys == nil || len(doc.Keys) < 3) {
				err = fmt.Errorf("%d keys", len(doc.Keys))
			}
			if err != nil {
				bad.Add(1)
				firstBad.CompareAndSwap(nil, fmt.Sprintf("%v: %q", err, data))
			}
		}
	})
	for i := range 200 {
		if err := f.Set("beta", "burst", i); err != nil {
			t.Fatal(err)
		}
		if err := f.Save(); err != nil {
			t.Fatalf("Save %d: %v", i, err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if n := bad.Load(); n > 0 {
		t.Errorf("%d of %d reads saw a broken file; first: %v", n, reads.Load(), firstBad.Load())
	}
	if reads.Load() == 0 {
		t.Error("the reader never read the file")
	}
	raw, _ := f.Entry("beta")
	if !strings.Contains(string(raw), `"burst": 199`) {
		t.Errorf("last entry %s, want burst 199", raw)
	}
	assertNoTemps(t, dir)
}

// Member names are matched in any case, as the server's JSON decoder
// matches them: enabling a key written with "Disabled": true removes it.
// (An entry with a member twice, in any case, does not load: see
// TestLoadErrors.)
func TestSetMemberNameCase(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.json")
	if err := os.WriteFile(path, []byte(`{"keys": [
  {"ID": "a", "Hash": "sha256:aa", "Disabled": true}
]}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got := f.IDs(); len(got) != 1 || got[0] != "a" {
		t.Fatalf("IDs = %q, want [a]", got)
	}
	if err := f.Set("a", "disabled", nil); err != nil {
		t.Fatal(err)
	}
	e, _ := f.Entry("a")
	if bytes.Contains(bytes.ToLower(e), []byte("disabled")) {
		t.Fatalf("entry after enable = %s, want no disabled member in any case", e)
	}
	if err := f.Set("a", "disabled", true); err != nil {
		t.Fatal(err)
	}
	e, _ = f.Entry("a")
	if n := bytes.Count(bytes.ToLower(e), []byte(`"disabled"`)); n != 1 || !bytes.Contains(e, []byte(`"disabled": true`)) {
		t.Fatalf("entry after disable = %s, want one disabled: true", e)
	}
	if err := f.Add(json.RawMessage(`{"id": "b", "HASH": "SHA256:AA"}`)); err == nil {
		t.Fatal("Add of a hash written in another case succeeded, want a duplicate-hash error")
	}
}
