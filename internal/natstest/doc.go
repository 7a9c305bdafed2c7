// Package natstest starts real nats-servers with JetStream for tests: one
// embedded (in-process) server (Start, StartDir), or a cluster of
// nats-server processes (StartCluster) that a test can kill with SIGKILL,
// freeze with SIGSTOP, restart and restart one by one, with helpers that
// find the meta, stream and consumer leaders and create replicated streams
// and buckets. Outside tests, StartProcess runs one nats-server process
// (the benchmark harness's fresh server per run) and BuildServer provides
// the binary.
package natstest
