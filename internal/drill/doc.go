// Package drill runs the cell switch and failover drill against a running
// bridge and checks, from what actually arrived in every cell stream, that
// the bridge kept its switching guarantees.
//
// The scenario (Run) drives one topic rule with continuous load of keyed
// events that carry a per-key sequence number, and changes the rules the way
// an operator does, by replacing the files of the rules directory the bridge
// watches (ConfigMap-style `..data` symlink swap when the directory has that
// layout):
//
//  1. a planned switch of a shard range to another cell in three steps:
//     rules n+1 with the current owners and `blocked:` (computed with
//     router.Diff), a wait while the held messages grow, then rules n+2 with
//     the new owners and nothing blocked; the time from unblocking to
//     drained is measured;
//  2. a rules file with a lower version, which the bridge must refuse;
//  3. a disaster failover: a cell is marked down (cells whose failover was
//     that cell get another one, so that the rules validate) and its shards
//     go to its failover cell at once.
//
// Afterwards every arrival is checked by key, in order, against the rules
// version stamped on it (Cell-Rules-Version): nothing of a blocked shard was
// forwarded while blocked, nothing was lost or duplicated (by Cell-Msg-Id and
// by payload id), per-key order held across both moves, the other shards kept
// flowing while the range was blocked, nothing reached the down cell after the
// failover, and the lower version was refused. Each failed check is a
// Violation in the Report.
//
// The package does not start the bridge: cmd/cellbridge builds the embedded
// default and hands its addresses to Run, so the command and the tests share
// the scenario. Run owns its goroutines and stops them before it returns.
package drill
