// Package deploy holds no production code. Its tests prove that what deploy/ ships is correct: they
// render every kustomize overlay with kustomize's Go API and decode each object strictly into the
// Kubernetes API types, check the Deployment against the binary (probe paths, the drain deadline, the
// config and rules mounts, the image's command), run promtool on the alert rules and their unit tests,
// and check that every metric an alert or the dashboard reads is one the bridge exports.
//
// Some files under deploy/base are generated from their sources, because kustomize reads only files
// below the kustomization that names them and the Prometheus Operator wants the alert groups wrapped in
// a PrometheusRule:
//
//   - deploy/base/rules/ is a copy of deploy/rules plus a kustomization that turns it into the rules
//     ConfigMap;
//   - deploy/base/prometheusrule.yaml wraps the groups of deploy/alerts/cellbridge.rules.yaml.
//
// `go test ./deploy -update` rewrites both; without -update a test fails when either is stale.
package deploy
