package app

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
)

// get fetches url and returns the status code and body.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 20 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// Without http.pprof (the default) neither /debug/pprof/ nor
// /debug/timeline is served.
func TestPprofOffByDefault(t *testing.T) {
	e := newReplicaEnv(t, ruleSingle("ordering: none"), "")
	r := e.start(t, "a")
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/goroutine?debug=1", "/debug/timeline?seconds=0.1"} {
		if code, body := get(t, "http://"+r.a.HTTPAddr+path); code != http.StatusNotFound {
			t.Errorf("%s: %d %q, want 404", path, code, body)
		}
	}
}

// With http.pprof: true the bridge serves Go's profiles and the timeline:
// a recording taken while events flow follows each sampled message from
// the source's store time to its ack, stage by stage in order.
func TestPprofAndTimeline(t *testing.T) {
	e := newReplicaEnv(t, ruleSingle("ordering: none"), "")
	b, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	const listen = `http: {listen: "127.0.0.1:0"}`
	if !strings.Contains(string(b), listen) {
		t.Fatalf("%s has no line %q", e.cfg, listen)
	}
	cfg := strings.Replace(string(b), listen, `http: {listen: "127.0.0.1:0", pprof: true}`, 1)
	if err := os.WriteFile(e.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	r := e.start(t, "a")
	base := "http://" + r.a.HTTPAddr
	if code, body := get(t, base+"/debug/pprof/"); code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Fatalf("/debug/pprof/: %d %.200q", code, body)
	}
	if code, body := get(t, base+"/debug/pprof/goroutine?debug=1"); code != http.StatusOK || !strings.Contains(body, "goroutine profile") {
		t.Fatalf("/debug/pprof/goroutine: %d %.200q", code, body)
	}
	if code, _ := get(t, base+"/debug/timeline?every=0"); code != http.StatusBadRequest {
		t.Errorf("/debug/timeline?every=0: %d, want 400", code)
	}

	type result struct {
		code int
		body string
	}
	done := make(chan result, 1)
	go func() {
		// get would call t.Fatal off the test goroutine.
		resp, err := (&http.Client{Timeout: 30 * time.Second}).Get(base + "/debug/timeline?seconds=8&every=1")
		if err != nil {
			done <- result{0, err.Error()}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		done <- result{resp.StatusCode, string(b)}
	}()
	// The recording starts once the request is served: a second of room
	// on a loaded machine, and the 8 s window holds the events' settling.
	time.Sleep(time.Second)
	sent := e.publish(t, "r1", 0, 50, 10)
	e.check(t, sent)
	res := <-done
	if res.code != http.StatusOK {
		t.Fatalf("/debug/timeline: %d %.300q", res.code, res.body)
	}
	var rep bridge.TimelineReport
	if err := json.Unmarshal([]byte(res.body), &rep); err != nil {
		t.Fatalf("/debug/timeline: %v: %.300q", err, res.body)
	}
	if rep.Every != 1 || len(rep.Samples) != 50 || len(rep.Attempts) != 50 || rep.Dropped != 0 {
		t.Fatalf("timeline: every %d, %d samples, %d attempts, %d dropped; want every 1 and the 50 events", rep.Every, len(rep.Samples), len(rep.Attempts), rep.Dropped)
	}
	if strings.Join(rep.Stages, " ") != strings.Join(bridge.TimelineStages[:], " ") {
		t.Errorf("stages %v", rep.Stages)
	}
	for i, s := range rep.Samples {
		prev := int64(0)
		for st, at := range s {
			if at == 0 {
				t.Fatalf("sample %d: stage %s not passed: %v", i, rep.Stages[st], s)
			}
			// stored is the server's clock, the rest the bridge's: the
			// same machine here.
			if at < prev {
				t.Fatalf("sample %d: stage %s at %d before the previous stage at %d", i, rep.Stages[st], at, prev)
			}
			prev = at
		}
		if rep.Attempts[i] != 1 {
			t.Errorf("sample %d: %d attempts, want 1", i, rep.Attempts[i])
		}
	}
	if iv := rep.Intervals["total"]; iv["n"] != 50 || iv["p50"] <= 0 || iv["p50"] > iv["max"] {
		t.Errorf("total interval %v", iv)
	}
}
