//go:build !(linux || openbsd || dragonfly || darwin || ios || freebsd || netbsd)

package apikey

import (
	"os"
	"time"
)

// fileIdentity knows no inode or change time here (Windows): a zero
// change time makes every check read the file again, and compare its
// digest with the last one's, rather than trust an unchanged stamp.
func fileIdentity(os.FileInfo) (inode, dev uint64, ctime time.Time) {
	return 0, 0, time.Time{}
}
