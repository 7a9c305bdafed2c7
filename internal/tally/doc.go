// Package tally is the one account of keyed test events kept by the drill
// and the end-to-end tests: how such an event is written (a JSON body with
// a unique id, the shard key placed where the topic rule reads it, and a
// per-key sequence number), how a copy found in a cell stream or the DLQ is
// read back (FromMsg, ReadStream), and how what arrived is checked against
// what was sent (Check): lost, duplicated (by event id and by Cell-Msg-Id),
// misrouted, per-key reorderings within a stream, and the latency from the
// source stream to the cell stream.
//
// Check is pure: callers gather the arrivals (an ordered consumer that
// follows the streams, or a read of each stream at the end) and say, through
// Options.Owner, where each copy belongs.
package tally
