// Package switchover carries out the planned switch of shards between cells
// across every replica of a deployment (docs/switching.md): it writes the
// blocking rules, waits until every live replica runs them and publishes
// nothing decided before them, runs the catch-up check, writes the new
// rules and waits until every replica runs them and holds nothing of the
// moving shards. The rules directory is its state, so an interrupted switch
// is resumed by running it again. `cellbridge switch` and the drill use it.
package switchover
