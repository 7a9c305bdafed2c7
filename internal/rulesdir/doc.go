// Package rulesdir reads and replaces the files of a rules directory the
// way operators' tooling does (every update replaces all files at once:
// an atomic rename per file, or the `..data` symlink swap of a Kubernetes
// ConfigMap volume, so that the bridge's watcher never sees half a change),
// and edits the CellMap document of a set of rule files (version, owners,
// blocked shards, cell states and failovers) keeping the other documents
// and the comments. `cellbridge switch` and the drill change rules with it.
package rulesdir
