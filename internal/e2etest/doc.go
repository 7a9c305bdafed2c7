// Package e2etest runs the bridge as operators do, for the project's own
// end-to-end tests: the real `cellbridge` binary, built once per test
// binary (BridgeBinary), started as replica subprocesses that a test can
// kill with SIGKILL, stop with SIGTERM and restart (StartBridge), with a
// generated configuration (WriteConfig) that names the servers of a
// natstest cluster; a load generator (StartLoad) that publishes keyed
// events carrying a per-key sequence number and a unique id at a set rate,
// retrying through cluster faults without creating duplicates; and a check
// (Verify) that reads every cell stream and the DLQ back and counts what
// was lost, duplicated, misrouted and reordered, and how late each event
// arrived (internal/tally); VerifyCopies does the same per cell for the
// copies of a broadcast rule.
//
// Packages that use BridgeBinary call RemoveBinaries from their TestMain.
package e2etest
