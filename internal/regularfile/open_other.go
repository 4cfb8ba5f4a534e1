//go:build !unix

package regularfile

import "os"

// openFlags is plain O_RDONLY where there are no named pipes in the file
// system to wait on (Windows' live under \\.\pipe\, which is not a path a
// keys file is given at).
const openFlags = os.O_RDONLY
