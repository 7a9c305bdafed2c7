//go:build !unix

package natsjs

import "time"

func processCPU() time.Duration { return 0 }
