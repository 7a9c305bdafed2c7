package bridge

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A recording follows every sampled message through its stages in order,
// counts a retried publish's attempts, refuses a second recording while one
// runs, and stops sampling when it ends.
func TestTimeline(t *testing.T) {
	sink := newTestSink()
	failed := false
	sink.fail = func(o *Outgoing, attempt int) error {
		if headerValue(o.Header, "X-User-Id") == keyFor(10, 1) && attempt == 1 {
			failed = true
			return errors.New("injected")
		}
		return nil
	}
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: time.Millisecond}}, rulesDoc(1, "", 0), sink, nil)

	type result struct {
		rep *TimelineReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := e.p.Timeline(context.Background(), 2*time.Second, 1)
		done <- result{rep, err}
	}()
	eventually(t, "the recording starts", func() bool { return e.p.tl.Load() != nil })
	if _, err := e.p.Timeline(context.Background(), time.Millisecond, 1); !errors.Is(err, ErrTimelineBusy) {
		t.Fatalf("second recording: %v, want ErrTimelineBusy", err)
	}
	var acks []*ackRec
	for i := 1; i <= 5; i++ {
		m, a := msg("t", keyFor(10, i), `{"n":1}`)
		m.Time = time.Now().Add(-time.Millisecond)
		if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
			t.Fatal(err)
		}
		acks = append(acks, a)
	}
	for _, a := range acks {
		if err := a.result(t); err != nil {
			t.Fatal(err)
		}
	}
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	rep := res.rep
	if !failed || len(rep.Samples) != 5 || rep.Dropped != 0 || rep.Every != 1 {
		t.Fatalf("failed once %v; %d samples, %d dropped, every %d; want 5 samples of every message", failed, len(rep.Samples), rep.Dropped, rep.Every)
	}
	retried := 0
	for i, s := range rep.Samples {
		for st := 1; st < numStages; st++ {
			if s[st] == 0 || s[st] < s[st-1] {
				t.Fatalf("sample %d: stage %s at %d after %s at %d", i, TimelineStages[st], s[st], TimelineStages[st-1], s[st-1])
			}
		}
		if rep.Attempts[i] == 2 {
			retried++
		} else if rep.Attempts[i] != 1 {
			t.Errorf("sample %d: %d attempts", i, rep.Attempts[i])
		}
	}
	if retried != 1 {
		t.Errorf("%d samples with 2 attempts, want the one retried message", retried)
	}
	if iv := rep.Intervals["total"]; iv["n"] != 5 {
		t.Errorf("total interval %v", iv)
	}
	if e.p.tl.Load() != nil {
		t.Error("still recording after the report")
	}
	// A message after the recording carries no sample.
	m, a := msg("t", keyFor(20, 9), `{"n":1}`)
	if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
		t.Fatal(err)
	}
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
}

// summarizeTimeline reports each step's distribution and the total, and
// skips stages a sample did not pass.
func TestSummarizeTimeline(t *testing.T) {
	var s1, s2 [numStages]int64
	for st := range numStages {
		s1[st] = 1e9 + int64(st)*1e6   // 1ms per step
		s2[st] = 1e9 + int64(st)*2*1e6 // 2ms per step
	}
	s2[stageStored] = 0 // unknown store time
	s2[stageReserved] = 0
	iv := summarizeTimeline([][numStages]int64{s1, s2})
	if got := iv["routed"]; got["n"] != 2 || got["p50"] != 1 || got["max"] != 2 {
		t.Errorf("routed %v", got)
	}
	if got := iv["delivered"]; got["n"] != 1 || got["max"] != 1 {
		t.Errorf("delivered (stored unknown in one sample) %v", got)
	}
	if got := iv["published"]; got["n"] != 2 || got["max"] != 4 {
		t.Errorf("published after a skipped stage: %v, want the time since dispatched (4ms)", got)
	}
	if got := iv["total"]; got["n"] != 2 || got["p50"] != 7 || got["max"] != 14 {
		t.Errorf("total %v", got)
	}
}
