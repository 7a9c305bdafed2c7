// Package app wires the bridge: from a validated configuration and rule
// table it builds the connections, the dedupe store, the sinks, the sources,
// the pipeline, the rules watcher and the HTTP server as one fx application,
// starts them in dependency order and stops them in reverse; before anything
// is consumed it checks the streams the rules need (Preflight) and the rules
// version against the deployment's registry. `cellbridge run`, `demo` and
// `drill` and the benchmark harness all run the bridge through it, so that
// each of them runs what production runs. It also says what the rules need
// on each broker (Needs: `cellbridge streams`) and connects the commands that
// read a deployment (ConnectBroker, RegistrySource).
package app
