//go:build darwin || ios || freebsd || netbsd

package apikey

import (
	"os"
	"syscall"
	"time"
)

// fileIdentity returns the inode, device and change time of fi, for a
// fileStamp. (The change time's field is named Ctimespec here.)
func fileIdentity(fi os.FileInfo) (inode, dev uint64, ctime time.Time) {
	sys, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, time.Time{}
	}
	return uint64(sys.Ino), uint64(sys.Dev), time.Unix(sys.Ctimespec.Unix())
}
