// Package regularfile reads files that must be regular files, such as a
// keys file, without ever blocking on one that is not.
//
// os.ReadFile of a named pipe waits for a writer, for ever if none comes,
// and a read of a character device may not end either; a server that reads
// its keys file under a lock would then hold the lock for good. So the file
// is opened without waiting (O_NONBLOCK, which makes opening a named pipe
// return at once and does not change how a regular file reads), its type is
// checked on the open descriptor, so that it cannot be swapped in between,
// and only a regular file is read.
package regularfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
)

// ErrNotRegular is wrapped by the error for a path that is not a regular
// file, so that a caller can tell it from a missing or unreadable one.
var ErrNotRegular = errors.New("not a regular file")

// ReadFile reads the regular file at path, following symlinks, and returns
// its metadata as of the read. Anything else (a named pipe, a device, a
// directory, a socket) it refuses, without blocking, with an error that
// wraps ErrNotRegular and says what it is: "not a regular file (a named
// pipe)". Other errors are those of the os package, which name the path.
func ReadFile(path string) ([]byte, os.FileInfo, error) {
	// Not even opened if it is not a regular file now: opening some
	// devices does something. The check after the open is the one that
	// counts, since the path may change in between.
	if fi, err := os.Stat(path); err == nil && !fi.Mode().IsRegular() {
		return nil, nil, notRegular(fi.Mode())
	}
	f, err := os.OpenFile(path, openFlags, 0)
	if err != nil {
		// Opening a socket fails (ENXIO), which says less than what
		// it is.
		if fi, serr := os.Stat(path); serr == nil && !fi.Mode().IsRegular() {
			return nil, nil, notRegular(fi.Mode())
		}
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, nil, notRegular(fi.Mode())
	}
	data, err := readAll(f, fi.Size())
	if err != nil {
		return nil, nil, err
	}
	return data, fi, nil
}

// readAll is io.ReadAll with the buffer made at the file's size, as
// os.ReadFile makes it: a keys file of a million keys is 100 MB, and
// growing a buffer to that size would leave twice as much garbage.
func readAll(f *os.File, size int64) ([]byte, error) {
	// One byte more, so that the read that finds the end does not grow
	// the buffer; a file that grew since the stat still reads whole.
	if size < 0 || size >= math.MaxInt {
		size = 0 // too large to hold (a 32-bit build): let it grow, and fail
	}
	data := make([]byte, 0, max(int(size)+1, 512))
	for {
		n, err := f.Read(data[len(data):cap(data)])
		data = data[:len(data)+n]
		if err == io.EOF {
			return data, nil
		}
		if err != nil {
			return nil, err
		}
		if len(data) == cap(data) {
			data = append(data, 0)[:len(data)]
		}
	}
}

// notRegular is the error for a file of mode m.
func notRegular(m fs.FileMode) error {
	return fmt.Errorf("%w (%s)", ErrNotRegular, kind(m))
}

// kind names the type of a file that is not regular.
func kind(m fs.FileMode) string {
	switch {
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	case m.IsDir():
		return "a directory"
	case m&fs.ModeSymlink != 0:
		return "a symlink"
	}
	return fmt.Sprintf("a file of type %v", m.Type())
}
