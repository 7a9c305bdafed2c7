// Package rmqtesting holds the test helpers of the in-process RocketMQ broker (package
// internal/rmqtest): starting one for a test with StartTB, and the goleak options that ignore the
// goroutines the real RocketMQ client leaves behind. It imports testing and goleak, so only test
// files import it; binaries that run the broker (the bench harness) use rmqtest directly.
package rmqtesting
