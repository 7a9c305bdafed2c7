package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
)

// childSpec is what the parent asks one child process to do: one run of one
// variant on a fresh embedded server.
type childSpec struct {
	Variant    string  `json:"variant"`
	N          int     `json:"n"`
	Seed       uint64  `json:"seed"`
	Rules      string  `json:"rules"`
	Fault      bool    `json:"fault"`       // fail the first attempt of every 1000th message
	Rate       float64 `json:"rate"`        // > 0: paced producer at this rate while the variant runs (latency mode)
	CPUProfile string  `json:"cpu_profile"` // file for a CPU profile of the timed phase
	MemProfile string  `json:"mem_profile"` // file for an allocation profile of the timed phase
	Tune       string  `json:"tune"`        // variant-specific tuning, "k=v,k=v"
	Soak       string  `json:"soak"`        // soak duration (soak mode)
}

// childResult is what a child reports back (as JSON in a file).
type childResult struct {
	Variant    string             `json:"variant"`
	N          int                `json:"n"`
	Seconds    float64            `json:"seconds"`
	MsgsPerS   float64            `json:"msgs_per_s"`
	Delivered  int                `json:"delivered"` // messages in the cell streams at the end
	Unique     int                `json:"unique"`    // distinct orders among them
	Misrouted  int                `json:"misrouted"`
	Verified   bool               `json:"verified"`
	VerifyNote string             `json:"verify_note,omitempty"`
	Mallocs    uint64             `json:"mallocs"`     // process-wide heap allocations during the timed phase
	HeapBytes  uint64             `json:"alloc_bytes"` // process-wide bytes allocated during the timed phase
	PeakRSSMB  float64            `json:"peak_rss_mb"` // VmHWM of the run phase (server + variant)
	LatencyMS  map[string]float64 `json:"latency_ms,omitempty"`
	CPUus      float64            `json:"cpu_us_per_msg"` // process CPU (user+sys, server included) per forwarded message

	Settings  string         `json:"settings,omitempty"`
	Redeliver int            `json:"redelivered,omitempty"`
	Extra     map[string]any `json:"extra,omitempty"`
}

// env is what a variant gets: a fresh server with the source stream already
// holding the events (or being fed by the paced producer) and empty cell
// streams.
type env struct {
	url    string
	srv    *server.Server
	table  *cellTable
	spec   childSpec
	tune   map[string]string
	events []event
	// faults counts injected failures (fault mode).
	faults *faultInjector
	// settings is filled by the variant with a human-readable description of
	// its configuration, reported in the output.
	settings string
	// kvBucket is set by the KV references (A-kv1, A-kv2): verification
	// then also wants that bucket to hold N keys.
	kvBucket string
}

// variantFunc runs until ctx is cancelled and then shuts down cleanly.
type variantFunc func(ctx context.Context, e *env) error

func variantByName(name string) (variantFunc, error) {
	base := strings.TrimSuffix(name, "-fault")
	if partitionedVariants[base] > 0 {
		return runCellbridge, nil
	}
	switch base {
	case "A", "A-kv1", "A-kv2":
		return runPipe, nil
	case "D":
		return runWatermill, nil
	case "B", "C", "O":
		return runCellbridge, nil
	case "A" + bcSuffix:
		return runPipeBroadcast, nil
	case "B" + bcSuffix:
		return runBridgeBroadcast, nil
	}
	return nil, fmt.Errorf("unknown variant %q", name)
}

func parseTune(s string) map[string]string {
	m := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if kv == "" {
			continue
		}
		k, v, _ := strings.Cut(kv, "=")
		m[strings.TrimSpace(k)] = strings.TrimSpace(v)
	}
	return m
}

func (e *env) tuneInt(k string, def int) int {
	if v, ok := e.tune[k]; ok {
		if n, err := strconv.Atoi(v); err == nil {
			return n
		}
	}
	return def
}

func (e *env) tuneStr(k, def string) string {
	if v, ok := e.tune[k]; ok {
		return v
	}
	return def
}

// pollEvery is the completion check's interval: short enough for a 2-4 s run
// (±0.5%%), long enough to stay off the server's hot path.
var pollEvery = func() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("BENCH_POLL")); err == nil {
		return d
	}
	return 10 * time.Millisecond
}()

// createStreams makes the source stream ORDERS, one stream per cell and the
// DLQ, all with file storage. maxMsgs > 0 bounds them (soak). partitions > 0
// gives ORDERS the subject transform of a rule with that many partitions
// keyed by the user id token of "orders.<user>.created".
func createStreams(ctx context.Context, js jetstream.JetStream, t *cellTable, maxMsgs int64, partitions int) error {
	orders := jetstream.StreamConfig{Name: "ORDERS", Subjects: []string{"orders.>"}}
	if partitions > 0 {
		tr, err := natsjs.PartitionTransform(partitionedSubject, 2, partitions)
		if err != nil {
			return err
		}
		orders.Subjects, orders.SubjectTransform = []string{partitionedSubject}, &tr
	}
	cfgs := []jetstream.StreamConfig{
		orders,
		{Name: "DLQ", Subjects: []string{"dlq.>"}},
	}
	for _, c := range append(append([]string{}, t.cells...), t.global) {
		if c == "" {
			continue
		}
		cfgs = append(cfgs, jetstream.StreamConfig{Name: streamOf(c), Subjects: []string{"cell." + c + ".>"}})
	}
	for _, cfg := range cfgs {
		cfg.Storage = jetstream.FileStorage
		if maxMsgs > 0 {
			cfg.MaxMsgs = maxMsgs
		}
		if _, err := js.CreateStream(ctx, cfg); err != nil {
			return fmt.Errorf("create stream %s: %w", cfg.Name, err)
		}
	}
	return nil
}

// partitionedSubject is the source subject of the partitioned variant: the
// user id is the second token, the key the stream partitions on.
const partitionedSubject = "orders.*.>"

// subjectOf is the subject an event is published on: the user id in it when
// the stream is partitioned on it.
func subjectOf(ev *event, keyed bool) string {
	if keyed {
		return "orders." + ev.user + ".created"
	}
	return "orders.created"
}

// prePublish stores all events in ORDERS before timing starts, with the
// producer's Nats-Msg-Id on each (keyed: the user id in the subject).
func prePublish(ctx context.Context, js jetstream.JetStream, evs []event, keyed bool) error {
	const window = 4096
	futs := make([]jetstream.PubAckFuture, 0, window)
	flush := func() error {
		for _, f := range futs {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				return fmt.Errorf("pre-publish: %w", err)
			case <-time.After(30 * time.Second):
				return errors.New("pre-publish: no ack in 30s")
			}
		}
		futs = futs[:0]
		return nil
	}
	for i := range evs {
		m := &nats.Msg{Subject: subjectOf(&evs[i], keyed), Data: evs[i].body, Header: nats.Header{nats.MsgIdHdr: []string{evs[i].id}}}
		f, err := js.PublishMsgAsync(m, jetstream.WithStallWait(30*time.Second))
		if err != nil {
			return fmt.Errorf("pre-publish: %w", err)
		}
		futs = append(futs, f)
		if len(futs) == window {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// pubTimeHdr carries the time the producer was due to publish the event
// (unix ns) in latency mode.
const pubTimeHdr = "Bench-Pub-Ns"

// pacedPublish feeds the source stream at a fixed rate: every millisecond it
// publishes the messages that are due, stamping each with its publish time.
func pacedPublish(ctx context.Context, url string, evs []event, rate float64, keyed bool) error {
	nc, err := nats.Connect(url)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
	if err != nil {
		return err
	}
	start := time.Now()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	sent := 0
	for sent < len(evs) {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		due := int(time.Since(start).Seconds() * rate)
		if due > len(evs) {
			due = len(evs)
		}
		for ; sent < due; sent++ {
			// Stamped with the time it was due, not the time it went out:
			// a producer that falls behind (descheduled on a busy machine,
			// or stalled on its pending acks) delays the events it owes,
			// and that delay is part of their latency (no coordinated
			// omission).
			at := start.Add(time.Duration(float64(sent) / rate * float64(time.Second)))
			m := &nats.Msg{Subject: subjectOf(&evs[sent], keyed), Data: evs[sent].body, Header: nats.Header{
				nats.MsgIdHdr: []string{evs[sent].id},
				pubTimeHdr:    []string{strconv.FormatInt(at.UnixNano(), 10)},
			}}
			if _, err := js.PublishMsgAsync(m, jetstream.WithStallWait(30*time.Second)); err != nil {
				return err
			}
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
	}
	return nil
}

// verify reads every message of every cell stream: the total must be N, each
// order exactly once, each in the cell the rule assigns to its user id. In
// latency mode it also computes producer-publish → cell-store latency.
func verify(ctx context.Context, js jetstream.JetStream, e *env, res *childResult) error {
	var notes []string
	// The KV bucket first: the KV references' keys carry a 30s TTL
	// (A-kv1's reservations), and reading the cell streams takes a while.
	if e.kvBucket != "" {
		s, err := js.Stream(ctx, "KV_"+e.kvBucket)
		if err != nil {
			return err
		}
		info, err := s.Info(ctx)
		if err != nil {
			return err
		}
		st := info.State
		if res.Extra == nil {
			res.Extra = map[string]any{}
		}
		res.Extra["kv_msgs"], res.Extra["kv_subjects"], res.Extra["kv_stored_total"] = st.Msgs, st.NumSubjects, st.LastSeq
		if n := kvNote(e.kvBucket, st, e.spec.N); n != "" {
			notes = append(notes, n)
		}
	}
	tl := newTally(e.table, res, e.spec.N)
	var latDump *os.File
	if p := os.Getenv("BENCH_LATDUMP"); p != "" && e.spec.Rate > 0 {
		latDump, _ = os.Create(fmt.Sprintf("%s-%s-%.0f", p, e.spec.Variant, e.spec.Rate))
		defer latDump.Close()
	}
	// The cells are read at once (one ordered consumer each) and tallied
	// in cell order afterwards.
	cells := e.table.cells
	read := make([][]cellCopy, len(cells))
	errs := make([]error, len(cells))
	var wg sync.WaitGroup
	for i, c := range cells {
		wg.Go(func() { read[i], errs[i] = readCell(ctx, js, c, e.spec.Rate > 0) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	var lat []float64
	for i, c := range cells {
		for _, cp := range read[i] {
			order, ok := tl.add(c, cp.body)
			if ok && cp.latencyMS >= 0 {
				lat = append(lat, cp.latencyMS)
				if latDump != nil {
					fmt.Fprintf(latDump, "%d %.3f\n", order, cp.latencyMS)
				}
			}
		}
	}
	notes = append(notes, tl.notes("cell streams")...)
	res.Verified = len(notes) == 0
	res.VerifyNote = strings.Join(notes, "; ")
	if len(lat) > 0 {
		res.LatencyMS = latencySummary(lat)
	}
	return nil
}

// cellCopy is one message read back from a cell stream: its body, and in
// latency runs the time from its publish-time stamp to its store time in
// the cell stream (-1 without a stamp).
type cellCopy struct {
	body      []byte
	latencyMS float64
}

// readCell reads every message of cell's stream.
func readCell(ctx context.Context, js jetstream.JetStream, cell string, latency bool) ([]cellCopy, error) {
	s, err := js.Stream(ctx, streamOf(cell))
	if err != nil {
		return nil, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, err
	}
	total := int(info.State.Msgs)
	if total == 0 {
		return nil, nil
	}
	oc, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, err
	}
	it, err := oc.Messages(jetstream.PullMaxMessages(4096))
	if err != nil {
		return nil, err
	}
	defer it.Stop()
	out := make([]cellCopy, 0, total)
	for range total {
		m, err := it.Next()
		if err != nil {
			return nil, fmt.Errorf("verify %s: %w", cell, err)
		}
		cp := cellCopy{body: m.Data(), latencyMS: -1}
		if latency {
			if v := m.Headers().Get(pubTimeHdr); v != "" {
				if ns, err := strconv.ParseInt(v, 10, 64); err == nil {
					if md, err := m.Metadata(); err == nil {
						cp.latencyMS = float64(md.Timestamp.UnixNano()-ns) / 1e6
					}
				}
			}
		}
		out = append(out, cp)
	}
	return out, nil
}

// kvNote says what is wrong with a KV reference's bucket at the end of a run
// ("" when nothing is): it must hold one message under each of n keys.
func kvNote(bucket string, st jetstream.StreamState, n int) string {
	if st.Msgs == uint64(n) && st.NumSubjects == uint64(n) {
		return ""
	}
	return fmt.Sprintf("KV bucket %s holds %d messages under %d keys, want %d", bucket, st.Msgs, st.NumSubjects, n)
}

// readRSSMB reads this process's current VmRSS, in MiB.
func readRSSMB() float64 { return procStatusMB(0, "VmRSS:") }
