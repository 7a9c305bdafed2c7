package main

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

func TestMain(m *testing.M) {
	opts := append(rmqtesting.IgnoreClientGoroutines(),
		// watermill's map key repository starts a clean-up loop on a
		// background context that nothing stops (a library leak by design).
		goleak.IgnoreTopFunction("github.com/ThreeDotsLabs/watermill/message/router/middleware.(*mapExpiringKeyRepository).cleanOutLoop"))
	goleak.VerifyTestMain(m, opts...)
}
