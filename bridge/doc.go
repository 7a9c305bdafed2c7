// Package bridge is the cellbridge pipeline: it takes messages from a
// Source, asks the rules table (package router) which cell owns each one,
// reserves the message's idempotency key in a dedupe store, republishes the
// message into the owning cell's target through a Sink, and acknowledges the
// source message only after the sink confirmed.
//
// The package defines the small interfaces adapters implement (Source,
// Sink, Ack, Handler), the Pipeline that connects them, the Prometheus
// metrics (Metrics, MetricList), health and readiness (Health) and the HTTP
// endpoints (NewHTTP). Adapters live in sub-packages and depend on this
// package, never the other way round.
//
// The delivery-guarantee argument and the concurrency rules that the code
// below follows are written down in docs/guarantees.md; read it before
// changing the order of any step in pipeline.go.
package bridge
