package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// The timeline follows sampled messages through the pipeline, stage by
// stage, so that an operator (or the benchmark) can see where a message
// waits: in the source before the bridge takes it, for an in-flight slot,
// behind its key in the lane, in the dedupe store, in the sink's publish
// queue or for the broker's ack. It costs one atomic load per message while
// nobody records, and a few clock reads per sampled message while
// Timeline runs.

// TimelineStages names the stages of a forwarded message in the order it
// passes them; TimelineReport.Samples hold one unix-nanosecond time per
// stage, 0 where the message did not pass it (stored: unknown to the
// source).
//
//   - stored: the source broker stored the message (Message.Time).
//   - delivered: the source handed it to the pipeline (Handle).
//   - routed: the rules decided its cell.
//   - admitted: it took an in-flight slot (waits while MaxInFlight are in
//     flight).
//   - dispatched: it became its key's active message and its dedupe
//     reservation started (later than admitted while an earlier message of
//     the key was in flight; for a retried message, the last attempt).
//   - reserved: the dedupe store answered.
//   - published: it was handed to the sink (PublishAsync called).
//   - confirmed: the sink reported the broker's answer (the PubAck).
//   - acked: the source's ack was sent.
var TimelineStages = [...]string{"stored", "delivered", "routed", "admitted", "dispatched", "reserved", "published", "confirmed", "acked"}

const (
	stageStored = iota
	stageDelivered
	stageRouted
	stageAdmitted
	stageDispatched
	stageReserved
	stagePublished
	stageConfirmed
	stageAcked
	numStages
)

// Timeline limits.
const (
	// MaxTimelineDuration bounds one recording.
	MaxTimelineDuration = time.Minute
	// MaxTimelineSamples bounds the samples one recording keeps; later
	// sampled messages are counted in TimelineReport.Dropped.
	MaxTimelineSamples = 200000
)

// ErrTimelineBusy is Timeline's error while another recording runs.
var ErrTimelineBusy = errors.New("bridge: a timeline is already being recorded")

// TimelineReport is what Timeline recorded.
type TimelineReport struct {
	// Every is the sampling interval: one in Every messages was followed.
	Every int `json:"every"`
	// Seconds is how long the recording ran.
	Seconds float64 `json:"seconds"`
	// Stages is TimelineStages.
	Stages []string `json:"stages"`
	// Samples holds, per sampled message that was settled during the
	// recording, one unix-nanosecond time per stage (0: not passed).
	Samples [][numStages]int64 `json:"samples"`
	// Attempts is, per sample, how many times its publish was tried.
	Attempts []int `json:"attempts"`
	// Dropped counts sampled messages beyond MaxTimelineSamples.
	Dropped int `json:"dropped"`
	// Intervals summarises, for each stage after stored, the time from the
	// previous stage the message passed to it, and "total" from delivered
	// to acked (ms): p50, p90, p99, max, and n.
	Intervals map[string]map[string]float64 `json:"intervals_ms"`
}

// timeline is one recording: which messages to sample and what they went
// through.
type timeline struct {
	every uint64
	n     atomic.Uint64

	mu       sync.Mutex
	samples  [][numStages]int64
	attempts []int
	dropped  int
}

// tlSample is the record of one sampled message, carried by its task.
type tlSample struct {
	tl       *timeline
	at       [numStages]int64
	attempts int
}

// start decides whether the message delivered at (unix ns) with store time
// stored is sampled, and returns its record if so.
func (tl *timeline) start(stored time.Time, at int64) *tlSample {
	if tl.n.Add(1)%tl.every != 0 {
		return nil
	}
	s := &tlSample{tl: tl}
	if !stored.IsZero() {
		s.at[stageStored] = stored.UnixNano()
	}
	s.at[stageDelivered] = at
	return s
}

// mark records that the sampled message reached stage now; no-op for a
// message that is not sampled.
func (s *tlSample) mark(stage int) {
	if s != nil {
		s.at[stage] = time.Now().UnixNano()
	}
}

// end records the sample once its message is settled.
func (s *tlSample) end() {
	s.at[stageAcked] = time.Now().UnixNano()
	tl := s.tl
	tl.mu.Lock()
	if len(tl.samples) < MaxTimelineSamples {
		tl.samples = append(tl.samples, s.at)
		tl.attempts = append(tl.attempts, s.attempts)
	} else {
		tl.dropped++
	}
	tl.mu.Unlock()
}

// Timeline follows one in every messages that are not broadcast for d
// (at most MaxTimelineDuration), or until ctx ends, and returns the
// stage times of those settled meanwhile (see TimelineStages). Only one
// recording runs at a time: ErrTimelineBusy otherwise.
func (p *Pipeline) Timeline(ctx context.Context, d time.Duration, every int) (*TimelineReport, error) {
	if every < 1 {
		every = 1
	}
	d = min(d, MaxTimelineDuration)
	tl := &timeline{every: uint64(every)}
	if !p.tl.CompareAndSwap(nil, tl) {
		return nil, ErrTimelineBusy
	}
	start := time.Now()
	t := time.NewTimer(d)
	select {
	case <-ctx.Done():
	case <-t.C:
	}
	t.Stop()
	p.tl.Store(nil)
	// Samples still in flight are recorded by whoever settles them;
	// waiting for them would make the report depend on the slowest.
	tl.mu.Lock()
	defer tl.mu.Unlock()
	r := &TimelineReport{Every: every, Seconds: time.Since(start).Seconds(), Stages: TimelineStages[:],
		Samples: slices.Clone(tl.samples), Attempts: slices.Clone(tl.attempts), Dropped: tl.dropped}
	r.Intervals = summarizeTimeline(r.Samples)
	return r, ctx.Err()
}

// summarizeTimeline computes TimelineReport.Intervals.
func summarizeTimeline(samples [][numStages]int64) map[string]map[string]float64 {
	iv := map[string][]float64{}
	for _, s := range samples {
		prev := int64(0)
		for st := range numStages {
			if s[st] == 0 {
				continue
			}
			if prev != 0 {
				iv[TimelineStages[st]] = append(iv[TimelineStages[st]], float64(s[st]-prev)/1e6)
			}
			prev = s[st]
		}
		if s[stageDelivered] != 0 {
			iv["total"] = append(iv["total"], float64(s[stageAcked]-s[stageDelivered])/1e6)
		}
	}
	out := map[string]map[string]float64{}
	for k, v := range iv {
		slices.Sort(v)
		q := func(p float64) float64 { return v[int(p*float64(len(v)-1))] }
		out[k] = map[string]float64{"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v[len(v)-1], "n": float64(len(v))}
	}
	return out
}

// TimelineHandler serves Timeline over HTTP (cellbridge mounts it at
// /debug/timeline when http.pprof is on): GET ?seconds=S (default 5, at
// most 60) &every=K (default 100) records for S seconds and answers the
// TimelineReport as JSON; 409 while another recording runs, 400 for a bad
// parameter.
func TimelineHandler(p *Pipeline) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sec, every := 5.0, 100
		q := r.URL.Query()
		if v := q.Get("seconds"); v != "" {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f <= 0 || f > MaxTimelineDuration.Seconds() {
				httpError(w, http.StatusBadRequest, "seconds: want a number in (0, 60], got "+quote(v))
				return
			}
			sec = f
		}
		if v := q.Get("every"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				httpError(w, http.StatusBadRequest, "every: want a positive integer, got "+quote(v))
				return
			}
			every = n
		}
		rep, err := p.Timeline(r.Context(), time.Duration(sec*float64(time.Second)), every)
		if errors.Is(err, ErrTimelineBusy) {
			httpError(w, http.StatusConflict, err.Error())
			return
		}
		if err != nil {
			return // the client went away
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(rep) // not indented: a sample per line would be most of it
	})
}
