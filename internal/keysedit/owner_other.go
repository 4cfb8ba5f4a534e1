//go:build !unix

package keysedit

import "os"

// keepOwner does nothing where files have no Unix owner (Windows): the
// temporary file gets the directory's default permissions.
func keepOwner(*os.File, os.FileInfo) error { return nil }
