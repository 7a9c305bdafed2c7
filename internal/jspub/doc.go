// Package jspub is the one pipelined request-and-reply core under the
// JetStream sink (bridge/natsjs) and the JetStream KV dedupe store (dedupe):
// it publishes a message with a reply inbox, matches the reply (a PubAck, a
// JetStream API error, a server status, or any reply for requests such as
// direct gets), fails a request whose reply does not come within a
// timeout, and fails requests at once while the connection is down. A fix
// here reaches both.
//
// # Why not the client library
//
// jetstream.PublishMsgAsync costs a map of futures, channels per publish,
// a JSON decode per ack and a goroutine hand-off per message, about as much
// CPU as the rest of the bridge's path; a synchronous request per message
// (nats.Conn.RequestMsg, jetstream.Publish) costs an inbox or a channel and
// a timer per request and serialises the caller. Pipe instead publishes with
// core NATS and reads every reply on one wildcard subscription.
//
// # The slot table
//
// Every request occupies one slot of a fixed table of Config.MaxPending
// slots and asks for its reply on the subject prefix+token, where the token
// encodes the slot index and the slot's generation (bumped each time the
// slot is taken). The subscription's callback finds the slot by index,
// ignores the reply when the generation differs (a late reply of a request
// that already failed, for a slot used again since, so it can never be
// taken for another request's), and runs the completion right there. A slot
// is free again only after the completion returned, so MaxPending bounds
// the requests whose completion has not run yet, and Send blocks at the cap:
// that is the callers' back-pressure.
//
// A slot moves free → sending → pending → resolving → free; failing
// replaces pending when a failure (Close's deadline, a disconnect) hits a
// request whose PublishMsg has not returned yet: the completion may not run
// while the client still reads the caller's message (the bridge recycles it
// once told the outcome), so Send resolves it afterwards. The phase and
// generation share one atomic word, so the reply path claims a slot with a
// compare-and-swap and takes the mutex only to free it.
//
// # Timeouts, disconnects, closing
//
// One goroutine per Pipe sweeps the table every Config.Timeout/4 (within
// 100ms..1s) and fails the requests older than the timeout; there is no
// timer per request. Ages are counted in sweeps, so sending costs no clock
// read. The same goroutine listens to the connection's status: when the
// connection drops, every outstanding request fails at once (its reply
// cannot arrive any more), and until it is back Send fails without handing
// the message to the client. A copy left in the client's reconnect buffer
// would be sent whenever the link returns, possibly minutes later, after
// the caller retried or gave up: for the sink, after another replica
// published the message again or its shard moved; for the store, a write
// nobody waits for.
//
// # Errors and retries
//
// Every failure the pipe reports wraps ErrNotSent (cannot have taken effect:
// repeat freely) or ErrNoReply (may have taken effect: a repeat must be
// idempotent), besides its cause (ErrTimeout, ErrClosed,
// nats.ErrDisconnected, a context error). Replies are the caller's: ReadAck
// reads a PubAck or the stream's refusal (*jetstream.APIError), with a
// scanner that handles the usual shapes without encoding/json and falls back
// to it for anything else (a fuzz target checks that both agree). The pipe
// never retries by itself: whether a repeat is safe depends on the request
// (a publish with Nats-Msg-Id inside the duplicate window is; an
// expected-sequence write must recognise its own earlier success).
//
// # Two forms
//
// Pipe[T] is asynchronous: Send returns once the message is handed to the
// client, and a Completion given to New receives each outcome with the
// caller's token T (the sink's token is the bridge's done callback, so a
// publish allocates nothing for its bookkeeping). Client wraps a Pipe for
// callers that wait for each reply in their own goroutine (the store).
package jspub
