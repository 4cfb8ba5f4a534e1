// Package testutil holds helpers that tests of more than one package use.
package testutil

import (
	"testing"
	"time"
)

// Within runs f and fails the test if it has not returned in 5 s, rather
// than hang the test binary: for calls that must not block, such as a
// read of a named pipe.
func Within(t testing.TB, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s still blocks after 5s", what)
	}
}
