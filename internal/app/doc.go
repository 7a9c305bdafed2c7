// Package app wires the bridge: from a validated configuration and rule
// table it builds the connections, the dedupe store, the sinks, the sources,
// the pipeline, the rules watcher and the HTTP server as one fx application,
// starts them in dependency order and stops them in reverse. `cellbridge
// run`, `demo` and `drill` and the benchmark harness all run the bridge
// through it, so that each of them runs what production runs.
package app
