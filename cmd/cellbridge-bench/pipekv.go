package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/dedupe"
)

// kvRefBucket is the key-value bucket of the KV references A-kv1 and A-kv2.
const kvRefBucket = "bench-kvref"

// kvWritesOf is the number of KV writes per message of the reference variant
// named v (0: not a KV reference).
func kvWritesOf(v string) int {
	switch v {
	case "A-kv1":
		return 1
	case "A-kv2":
		return 2
	}
	return 0
}

// kvRefHeader and kvRefValue make a reservation as dedupe's KV store writes
// one: create only if the key has no message, expire after ReserveTTL (30s),
// value "r" + a 16-hex-digit replica token.
var (
	kvRefHeader = nats.Header{
		jetstream.ExpectedLastSubjSeqHeader: {"0"},
		jetstream.MsgTTLHeader:              {"30s"},
	}
	kvRefValue     = []byte("r0123456789abcdef")
	kvCommitValue  = []byte("c")
	errKeyRefused  = errors.New("bench: KV create refused, the key exists")
	kvStallTimeout = jetstream.WithStallWait(time.Minute)
)

// kvStep is one source message between two stages of runPipeKV.
type kvStep struct {
	f   jetstream.PubAckFuture // the publish this stage waits for
	out *nats.Msg              // the cell message (published after the create)
	src jetstream.Msg
	key string // the message's KV subject
}

// runPipeKV is the KV references: the bare pipe (runPipe's connection,
// consumer and cell message) where each message, before its cell publish,
// makes one atomic create in a KV bucket laid out as dedupe's (writes=1,
// A-kv1), and with writes=2 (A-kv2) also overwrites the key with "c" after
// the cell publish was stored, before the source ack: the minimal loop of
// cellbridge's KV dedupe protocol (reserve, publish, commit) without its
// code. Every publish is awaited before the message's next step; the steps
// are pipelined in stages that each wait in order (as runPipe waits for its
// PubAcks), and the one JetStream context keeps at most window publishes in
// flight over all stages. Tuning: window, pull, conns as for runPipe.
//
// A create the server refuses (the key exists: a redelivery in a real run,
// none here) is counted and negatively acknowledged with a delay; any other
// failed publish is counted and negatively acknowledged; a failed overwrite
// is counted and the source still acknowledged (the cell holds the message),
// as the dedupe protocol does.
func runPipeKV(ctx context.Context, e *env, writes int) error {
	pc, err := openPipe(ctx, e)
	if err != nil {
		return err
	}
	defer pc.close()
	// Create the bucket exactly as the KV dedupe store does, then write to
	// it directly.
	st, err := dedupe.NewJetStream(ctx, pc.pjs, dedupe.KVConfig{Bucket: kvRefBucket, TTL: 10 * time.Minute, ReserveTTL: 30 * time.Second})
	if err != nil {
		return err
	}
	if err := st.Close(ctx); err != nil {
		return err
	}
	e.kvBucket = kvRefBucket
	prefix := "$KV." + kvRefBucket + "."

	var refused, kvFailed, cellFailed, commitFailed atomic.Int64
	wait := func(f jetstream.PubAckFuture) error {
		select {
		case <-f.Ok():
			return nil
		case err := <-f.Err():
			var ae *jetstream.APIError
			if errors.As(err, &ae) && (ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
				ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
				return errKeyRefused
			}
			return err
		}
	}
	q1 := make(chan kvStep, pc.window) // waiting for the create
	q2 := make(chan kvStep, pc.window) // waiting for the cell publish
	q3 := make(chan kvStep, pc.window) // waiting for the overwrite (writes=2)
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		defer close(q2)
		for s := range q1 {
			if err := wait(s.f); err != nil {
				if errors.Is(err, errKeyRefused) {
					refused.Add(1)
					_ = s.src.NakWithDelay(time.Second)
				} else {
					kvFailed.Add(1)
					_ = s.src.Nak()
				}
				continue
			}
			f, err := pc.pjs.PublishMsgAsync(s.out, kvStallTimeout)
			if err != nil {
				cellFailed.Add(1)
				_ = s.src.Nak()
				continue
			}
			q2 <- kvStep{f: f, src: s.src, key: s.key}
		}
	}()
	go func() {
		defer wg.Done()
		defer close(q3)
		for s := range q2 {
			if err := wait(s.f); err != nil {
				cellFailed.Add(1)
				_ = s.src.Nak()
				continue
			}
			if writes < 2 {
				_ = s.src.Ack()
				continue
			}
			f, err := pc.pjs.PublishMsgAsync(&nats.Msg{Subject: s.key, Data: kvCommitValue}, kvStallTimeout)
			if err != nil {
				commitFailed.Add(1)
				_ = s.src.Ack()
				continue
			}
			q3 <- kvStep{f: f, src: s.src}
		}
	}()
	go func() {
		defer wg.Done()
		for s := range q3 {
			if wait(s.f) != nil {
				commitFailed.Add(1)
			}
			_ = s.src.Ack()
		}
	}()
	err = pc.consume(ctx, func(m jetstream.Msg) {
		out, err := cellMsg(e, m, false)
		if err != nil {
			_ = m.Nak()
			return
		}
		key := prefix + dedupe.EncodeKey(out.Header.Get(nats.MsgIdHdr))
		f, err := pc.pjs.PublishMsgAsync(&nats.Msg{Subject: key, Header: kvRefHeader, Data: kvRefValue}, kvStallTimeout)
		if err != nil {
			kvFailed.Add(1)
			_ = m.Nak()
			return
		}
		q1 <- kvStep{f: f, out: out, src: m, key: key}
	})
	close(q1)
	wg.Wait()

	steps := "KV create, PubAck awaited → cell publish, PubAck awaited → Ack"
	if writes > 1 {
		steps = "KV create, PubAck awaited → cell publish, PubAck awaited → KV overwrite (value \"c\", no expectation, no TTL), PubAck awaited → Ack"
	}
	e.settings = fmt.Sprintf("A's loop (mode=consume window=%d pull=%d ack=async conns=%d) with %d KV write(s) per message: %s; "+
		"create = publish to $KV.%s.<dedupe.EncodeKey(Nats-Msg-Id)>, value r<16 hex>, Nats-Expected-Last-Subject-Sequence: 0, Nats-TTL: 30s; "+
		"bucket made by dedupe.NewJetStream (ttl 10m, reserveTTL 30s, file storage); steps pipelined, each stage waits in order, "+
		"at most window publishes in flight in all; refused=%d kv_errors=%d cell_errors=%d commit_errors=%d",
		pc.window, pc.pull, pc.conns, writes, steps, kvRefBucket, refused.Load(), kvFailed.Load(), cellFailed.Load(), commitFailed.Load())
	return err
}
