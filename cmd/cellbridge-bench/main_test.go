package main

import (
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

func TestMain(m *testing.M) {
	// The harness starts its loops as this binary with -variant-proc SPEC
	// -child-out FILE (os.Executable); under test that is the test binary.
	if len(os.Args) == 5 && os.Args[1] == "-variant-proc" && os.Args[3] == "-child-out" {
		os.Exit(variantProcMain(os.Args[2], os.Args[4]))
	}
	opts := append(rmqtesting.IgnoreClientGoroutines(),
		// watermill's map key repository starts a clean-up loop on a
		// background context that nothing stops (a library leak by design).
		goleak.IgnoreTopFunction("github.com/ThreeDotsLabs/watermill/message/router/middleware.(*mapExpiringKeyRepository).cleanOutLoop"))
	goleak.VerifyTestMain(m, opts...)
}
