//go:build unix

package regularfile

import (
	"os"
	"syscall"
)

// openFlags opens a named pipe without waiting for a writer, and a
// terminal without making it the process's controlling one (ReadFile
// refuses both once open; see its pre-check).
const openFlags = os.O_RDONLY | syscall.O_NONBLOCK | syscall.O_NOCTTY
