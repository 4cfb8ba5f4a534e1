//go:build unix

package regularfile

import (
	"os"
	"syscall"
)

// openFlags opens a named pipe without waiting for a writer.
const openFlags = os.O_RDONLY | syscall.O_NONBLOCK
