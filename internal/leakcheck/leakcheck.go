// Package leakcheck runs goleak after a package's tests, with a grace
// period fit for packages that start servers, subprocesses and clients.
//
// goleak's own VerifyTestMain looks for about half a second. The last
// test's connections, servers and client libraries stop their goroutines
// asynchronously, and on a loaded machine (the packages' test binaries run
// at once, under -race) that can take longer: a leak it reports then is
// not one. Find looks again until the goroutines are gone or the grace
// period ends, so a real leak is still reported, only a few seconds later.
package leakcheck

import (
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Grace is how long Find waits for goroutines to end.
const Grace = 10 * time.Second

// Main runs the package's tests, then Find when they passed, and exits
// with the result. cleanup, when set, runs after the tests and before the
// leak check (removing built binaries, say).
func Main(m *testing.M, cleanup func(), opts ...goleak.Option) {
	code := m.Run()
	if cleanup != nil {
		cleanup()
	}
	if code == 0 {
		if err := Find(Grace, opts...); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// Find is goleak.Find, repeated until it finds nothing or within has
// passed; it returns the last finding.
func Find(within time.Duration, opts ...goleak.Option) error {
	deadline := time.Now().Add(within)
	for {
		err := goleak.Find(opts...)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
