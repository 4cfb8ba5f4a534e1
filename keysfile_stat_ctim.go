//go:build linux || openbsd || dragonfly

package apikey

import (
	"os"
	"syscall"
	"time"
)

// fileIdentity returns the inode, device and change time of fi, for a
// fileStamp. (The change time's field is named Ctim here.)
func fileIdentity(fi os.FileInfo) (inode, dev uint64, ctime time.Time) {
	sys, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, time.Time{}
	}
	return uint64(sys.Ino), uint64(sys.Dev), time.Unix(sys.Ctim.Unix())
}
