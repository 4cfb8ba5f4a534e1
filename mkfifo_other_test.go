//go:build !unix

package apikey

import "testing"

// mkfifo skips the test: there are no named pipes in the file system
// here (Windows).
func mkfifo(t *testing.T, _ string) {
	t.Helper()
	t.Skip("no named pipes in the file system")
}
