// Package router turns rule files into an immutable routing table and decides,
// for each event, which cell owns it.
//
// A rules directory holds one `kind: CellMap` document (the shard space, the
// cells, their owned shard ranges, failover cells, pins and blocked shards)
// and one or more `kind: TopicRule` documents (where events come from, how the
// shard key is extracted, how a shard is computed and where the event goes).
// Load parses and validates the whole directory at once and reports every
// problem as "file:line: field: message".
//
// Resolution order for one event (Table.Resolve, Table.Route):
//
//  1. no usable key (missing, malformed, unparsable body) → the topic's
//     onMissingKey: the global cell (reason global) or the DLQ (reason dlq);
//  2. the key's shard is listed in `blocked` → held (nothing is forwarded);
//  3. the key is pinned → the pinned cell (reason pin), or its failover cell
//     when the pinned cell is down (reason failover);
//  4. the shard's owner (reason owner), or its failover cell when the owner is
//     down (reason failover).
//
// The package does no I/O except reading rule files, and imports nothing from
// the bridge. A Table is immutable and safe for concurrent use; Holder swaps
// tables atomically and Watcher reloads a directory when it changes
// (including Kubernetes ConfigMap volumes). Resolve is allocation-free: every
// target string is rendered when the table is compiled.
package router
