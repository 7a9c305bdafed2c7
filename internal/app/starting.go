package app

import (
	"errors"
	"sync"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/retry"
)

// startStatus is what the bridge is doing while it starts, for /readyz
// until the pipeline runs: the step under way ("connecting to broker nats
// (nats://...)") or, once an attempt of it failed, that attempt ("connecting
// to broker nats (nats://...): attempt 3 failed: ...; retrying in 400ms").
// Building the bridge waits for unreachable brokers without end (each
// attempt logged), so this is how a probe learns what it waits for.
type startStatus struct {
	mu   sync.Mutex
	step string
	last string // the last failed attempt of step, "" if none
}

// begin records the step the start is at now.
func (s *startStatus) begin(step string) {
	s.mu.Lock()
	s.step, s.last = step, ""
	s.mu.Unlock()
}

// failed records a failed attempt of the current step.
func (s *startStatus) failed(err error) {
	s.mu.Lock()
	s.last = err.Error()
	s.mu.Unlock()
}

// String is the /readyz reason while starting.
func (s *startStatus) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.last != "":
		return "starting: " + s.last
	case s.step != "":
		return "starting: " + s.step
	}
	return "starting"
}

// requests counts, and while starting shows, the failed attempts of the
// requests the bridge makes to its brokers (internal/retry reports them as
// *retry.AttemptError); the kinds pass report to their adapters'
// OnRequestError.
type requests struct {
	m      *bridge.Metrics
	status *startStatus
}

func newRequests(m *bridge.Metrics, status *startStatus) *requests {
	r := &requests{m: m, status: status}
	return r
}

// watch makes broker's series of cellbridge_broker_request_errors_total
// exist (0) from the start, one per request kind, so that a rate over them
// (the dashboard, an alert) sees the first failure.
func (r *requests) watch(broker string) {
	for _, op := range retry.Ops {
		r.m.BrokerReqErrors.WithLabelValues(broker, op)
	}
}

// report implements the adapters' OnRequestError.
func (r *requests) report(err error) {
	var ae *retry.AttemptError
	if !errors.As(err, &ae) {
		return
	}
	r.m.BrokerReqErrors.WithLabelValues(ae.Broker, ae.Op).Inc()
	r.status.failed(ae)
}

// publishRetried counts a failed publish attempt that a sink tries again
// itself (the pipeline counts the attempts whose failure it sees) in
// cellbridge_sink_publish_errors_total.
func (r *requests) publishRetried(broker string, _ error) {
	r.m.SinkPublishErrors.WithLabelValues(broker).Inc()
}
