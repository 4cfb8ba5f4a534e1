//go:build unix

package keysedit

import (
	"fmt"
	"os"
	"syscall"
)

// keepOwner gives tmp the owner and group of the file it replaces. Without
// it, root running a command on a file owned by the server's user would
// leave a file the server may be unable to read, and a key meant to be
// disabled would keep working.
func keepOwner(tmp *os.File, orig os.FileInfo) error {
	want, ok := orig.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	fi, err := tmp.Stat()
	if err != nil {
		return fmt.Errorf("reading the owner of %s: %w", tmp.Name(), err)
	}
	have, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || have.Uid == want.Uid && have.Gid == want.Gid {
		return nil
	}
	if err := tmp.Chown(int(want.Uid), int(want.Gid)); err != nil {
		return fmt.Errorf("giving %s the owner of the file (uid %d, gid %d); run the command as that user: %w", tmp.Name(), want.Uid, want.Gid, err)
	}
	return nil
}
