//go:build unix

package regularfile

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestReadFileNotRegular refuses, at once, every kind of file that is not
// regular. (Windows has none of them at paths a keys file is given at.)
func TestReadFileNotRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	fifoLink := filepath.Join(dir, "fifo-link")
	if err := os.Symlink(fifo, fifoLink); err != nil {
		t.Fatal(err)
	}
	// A short path: a socket's must fit in about 100 bytes.
	sockDir, err := os.MkdirTemp("", "rf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })

	for _, tc := range []struct {
		name, path, want string
	}{
		{"named pipe", fifo, "not a regular file (a named pipe)"},
		{"symlink to a named pipe", fifoLink, "not a regular file (a named pipe)"},
		{"directory", dir, "not a regular file (a directory)"},
		{"character device", os.DevNull, "not a regular file (a character device)"},
		{"socket", sock, "not a regular file (a socket)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data, fi, err := readSoon(t, tc.path)
			if err == nil || err.Error() != tc.want || !errors.Is(err, ErrNotRegular) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			if data != nil || fi != nil {
				t.Errorf("an error came with %d bytes and %v", len(data), fi)
			}
		})
	}
}
