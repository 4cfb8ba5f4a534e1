package regularfile

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// readSoon is ReadFile that fails the test, rather than hanging it, if
// the read blocks.
func readSoon(t *testing.T, path string) ([]byte, os.FileInfo, error) {
	t.Helper()
	type result struct {
		data []byte
		fi   os.FileInfo
		err  error
	}
	done := make(chan result, 1)
	go func() {
		data, fi, err := ReadFile(path)
		done <- result{data, fi, err}
	}()
	select {
	case r := <-done:
		return r.data, r.fi, r.err
	case <-time.After(5 * time.Second):
		t.Fatalf("ReadFile(%s) still blocks after 5s", path)
		return nil, nil, nil
	}
}

func TestReadFileRegular(t *testing.T) {
	dir := t.TempDir()
	for _, size := range []int{0, 1, 511, 512, 513, 100_000} {
		path := filepath.Join(dir, "f")
		want := bytes.Repeat([]byte("k"), size)
		if err := os.WriteFile(path, want, 0o600); err != nil {
			t.Fatal(err)
		}
		// Through a symlink too: a keys file is often one.
		link := filepath.Join(dir, "link")
		os.Remove(link)
		if err := os.Symlink(path, link); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{path, link} {
			data, fi, err := readSoon(t, p)
			if err != nil || !bytes.Equal(data, want) || fi.Size() != int64(size) || !fi.Mode().IsRegular() {
				t.Errorf("size %d, %s: read %d bytes, %v, %v", size, p, len(data), fi, err)
			}
		}
	}
}

func TestReadFileMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing")
	_, _, err := readSoon(t, path)
	if !errors.Is(err, os.ErrNotExist) || errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), path) {
		t.Errorf("err = %v, want one that names %s and wraps os.ErrNotExist", err, path)
	}
}
