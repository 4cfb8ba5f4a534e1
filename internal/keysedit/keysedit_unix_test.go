//go:build unix

package keysedit

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/keystile/caddy-apikey/internal/testutil"
)

// A named pipe at the path, or behind it, is refused at once: opening one
// for reading the ordinary way waits for a writer, for ever.
func TestNamedPipe(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.json")
	if err := os.Symlink(fifo, link); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{fifo, link} {
		for _, load := range []func(string) (*File, error){Load, LoadOrNew} {
			var err error
			testutil.Within(t, "loading "+path, func() { _, err = load(path) })
			if want := "loading keys file " + path + ": not a regular file (a named pipe)"; err == nil || err.Error() != want {
				t.Errorf("err = %v, want %s", err, want)
			}
		}
	}

	// A file replaced by one after Load: Save refuses and leaves it.
	path := writeFile(t, dir, "keys.json", canonical(entryA), 0o600)
	f := mustLoad(t, path)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	var err error
	testutil.Within(t, "saving", func() { err = f.Save() })
	if err == nil || !strings.Contains(err.Error(), "not a regular file (a named pipe)") || errors.Is(err, ErrChanged) {
		t.Errorf("Save over a named pipe: %v", err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("after Save the path is %v, %v; want the named pipe left alone", fi, err)
	}
	assertNoTemps(t, dir)
}

// Save gives the new file the owner of the one it replaces (as
// TestSaveKeepsMode keeps its mode), on systems with Unix owners.
func TestSaveKeepsOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("only root can give a file to another user")
	}
	path := writeFile(t, t.TempDir(), "keys.json", canonical(entryA), 0o600)
	const uid, gid = 65534, 65533
	if err := os.Chown(path, uid, gid); err != nil {
		t.Fatal(err)
	}
	f := mustLoad(t, path)
	if err := f.Set("acme-prod", "disabled", true); err != nil {
		t.Fatal(err)
	}
	if err := f.Save(); err != nil {
		t.Fatalf("Save: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Uid != uid || st.Gid != gid {
		t.Errorf("owner after Save = %d:%d, want %d:%d", st.Uid, st.Gid, uid, gid)
	}
}
