//go:build !unix

package natsjs

import "os"

// pauseSignals: no way to pause a process here, so the takeover test has no
// pause case.
var pauseSignals [2]os.Signal
