package deploy

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// liveBridge is a `cellbridge run` process on the embedded default (its own nats-server), with the rules
// directory laid out like a mounted ConfigMap.
type liveBridge struct {
	cmd      *exec.Cmd
	addr     string // HTTP host:port
	natsURL  string
	rulesDir string
	exited   chan struct{} // closed when the process has exited; waitErr is then set
	waitErr  error

	mu     sync.Mutex
	stderr strings.Builder
}

func freePort(t *testing.T) int { return natstest.FreePorts(t, 1)[0] }

// startBridge starts `cellbridge run` on the embedded default, with rulesFiles laid out like a
// mounted ConfigMap, and waits until /readyz answers 200.
func startBridge(t *testing.T, rulesFiles map[string][]byte) *liveBridge {
	t.Helper()
	rulesDir := filepath.Join(t.TempDir(), "rules")
	if err := os.Mkdir(rulesDir, 0o755); err != nil {
		t.Fatal(err)
	}
	atomicWrite(t, rulesDir, rulesFiles)
	b := startProcess(t, append(os.Environ(), "GOMEMLIMIT=460MiB"), true, "run", "-data", filepath.Join(t.TempDir(), "data"),
		"-http", "127.0.0.1:0", "-nats-port", strconv.Itoa(freePort(t)), "-rules", rulesDir)
	b.rulesDir = rulesDir
	return b
}

// startProcess runs the binary with args (which must include -http 127.0.0.1:0) and env, and waits
// until /readyz answers 200. With embedded it also waits for the embedded nats-server's URL.
func startProcess(t *testing.T, env []string, embedded bool, args ...string) *liveBridge {
	t.Helper()
	b := &liveBridge{exited: make(chan struct{})}
	b.cmd = exec.Command(cellbridgeBinary(t), args...)
	b.cmd.Env = env
	stderr, err := b.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	b.cmd.Stdout = io.Discard
	// The bridge logs the addresses it really listens on: HTTP on a port the kernel picked, NATS on the
	// preferred port or, when that is taken meanwhile, another free one.
	urlSeen, addrSeen := make(chan string, 1), make(chan string, 1)
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			b.mu.Lock()
			b.stderr.WriteString(line + "\n")
			b.mu.Unlock()
			var rec struct{ Msg, URL, Addr string }
			if json.Unmarshal([]byte(line), &rec) == nil {
				// Never block: the scanner must keep draining stderr, or the bridge stalls on logging.
				switch rec.Msg {
				case "embedded nats-server started":
					select {
					case urlSeen <- rec.URL:
					default:
					}
				case "http listening":
					select {
					case addrSeen <- rec.Addr:
					default:
					}
				}
			}
		}
		b.waitErr = b.cmd.Wait()
		close(b.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-b.exited:
		default:
			b.cmd.Process.Kill()
			<-b.exited
		}
		if t.Failed() {
			t.Logf("cellbridge stderr:\n%s", b.log())
		}
	})
	timeout := time.After(time.Minute)
	for (embedded && b.natsURL == "") || b.addr == "" {
		select {
		case b.natsURL = <-urlSeen:
		case b.addr = <-addrSeen:
		case <-b.exited:
			t.Fatalf("cellbridge run exited at start: %v\n%s", b.waitErr, b.log())
		case <-timeout:
			t.Fatalf("cellbridge run logged no HTTP address (or nats-server URL) within a minute\n%s", b.log())
		}
	}
	b.eventually(t, time.Minute, "/readyz answers 200", func() (bool, string) {
		code, body := b.get(t, "/readyz")
		return code == http.StatusOK, body
	})
	return b
}

func (b *liveBridge) log() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.stderr.String()
}

func (b *liveBridge) get(t *testing.T, path string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + b.addr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// eventually polls cond until it holds or the deadline passes.
func (b *liveBridge) eventually(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	var last string
	for {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s; last: %s", d, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// scrape returns the metric families of /metrics.
func (b *liveBridge) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := b.get(t, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return mf
}

// sum adds the values of a family's series whose labels include match.
func sum(mf map[string]*dto.MetricFamily, name string, match map[string]string) float64 {
	var total float64
	f := mf[name]
	if f == nil {
		return 0
	}
next:
	for _, m := range f.Metric {
		for k, v := range match {
			found := false
			for _, l := range m.Label {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			total += m.Counter.GetValue()
		case m.Gauge != nil:
			total += m.Gauge.GetValue()
		case m.Histogram != nil:
			total += float64(m.Histogram.GetSampleCount())
		}
	}
	return total
}

func (b *liveBridge) metric(t *testing.T, name string, match map[string]string) float64 {
	t.Helper()
	return sum(b.scrape(t), name, match)
}

// stop sends SIGTERM, as the kubelet does after the preStop pause, and waits for a clean exit within
// the time the Deployment grants after that pause.
func (b *liveBridge) stop(t *testing.T, within time.Duration) {
	t.Helper()
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-b.exited:
		if b.waitErr != nil {
			t.Errorf("cellbridge run after SIGTERM: %v", b.waitErr)
		}
	case <-time.After(within):
		t.Fatalf("cellbridge run did not exit within %v of SIGTERM", within)
	}
}

// event returns the i-th test event of a batch for the example rules: orders keyed by the user id in
// the JSON body, payments keyed by the X-User-Id header, and every 50th an order without a user id (to
// be dead-lettered as missing_key). The user ids make shard = i % 100, so every cell gets events.
func event(batch string, i int) (msg *nats.Msg, id string, poison bool) {
	id = fmt.Sprintf("%s-%d", batch, i)
	user := 2088000000000000 + int64(i)*10
	switch {
	case i%50 == 49:
		return &nats.Msg{Subject: "orders.created", Data: []byte(fmt.Sprintf(`{"id":%q}`, id))}, id, true
	case i%2 == 0:
		return &nats.Msg{Subject: "orders.created", Data: []byte(fmt.Sprintf(`{"id":%q,"user":{"id":%d}}`, id, user))}, id, false
	default:
		return &nats.Msg{Subject: "payments.settled", Header: nats.Header{"X-User-Id": {strconv.FormatInt(user, 10)}},
			Data: []byte(fmt.Sprintf(`{"id":%q}`, id))}, id, false
	}
}

var cellMapVersion = regexp.MustCompile(`(?m)^version:\s*\d+`)

// withVersion returns the rules files with the CellMap's version replaced (and extra appended to it).
func withVersion(t *testing.T, files map[string][]byte, version int, extra string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	found := false
	for k, v := range files {
		if cellMapVersion.Match(v) && strings.Contains(string(v), "kind: CellMap") {
			v = cellMapVersion.ReplaceAll(v, []byte("version: "+strconv.Itoa(version)))
			v = append(v, []byte(extra)...)
			found = true
		}
		out[k] = v
	}
	if !found {
		t.Fatal("no CellMap with a version line in the rules")
	}
	return out
}

// TestLiveBridge runs the real binary with the rendered rules ConfigMap laid out as the kubelet mounts
// it, routes real events through it, and checks what deploy/ depends on:
//   - the probe paths of every overlay answer 200 (and /status, /route, /metrics);
//   - a ConfigMap update (the ..data symlink swap) is loaded without a restart while events flow, and
//     every event still arrives exactly once in its cell;
//   - an invalid update and a lower version are refused, the previous rules stay in use, and the
//     CellbridgeRulesReloadFailed alert fires on the scraped counter (promtool);
//   - every metric an alert or the dashboard reads is in the live /metrics;
//   - SIGTERM drains and exits 0 within the grace period the Deployment grants.
func TestLiveBridge(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the bridge; not in -short")
	}
	// The overlay with the most rules (production adds a partitioned one, whose metrics the alerts read).
	r := render(t, overlays[0])
	for _, dir := range overlays[1:] {
		if o := render(t, dir); len(o.configMaps[rulesCMName].Data) > len(r.configMaps[rulesCMName].Data) {
			r = o
		}
	}
	cm := r.configMaps[rulesCMName]
	rules := map[string][]byte{}
	for k, v := range cm.Data {
		rules[k] = []byte(v)
	}
	b := startBridge(t, rules)

	// Every probe of every overlay is answered by the binary, and so are the paths the runbook uses.
	paths := []string{"/status", "/route?topic=orders&key=2088000000012345", "/metrics"}
	for _, dir := range overlays {
		paths = append(paths, probePaths(container(t, render(t, dir)))...)
	}
	for _, p := range paths {
		if code, body := b.get(t, p); code != http.StatusOK {
			t.Errorf("GET %s: %d %s", p, code, body)
		}
	}
	if v := b.metric(t, "cellbridge_rules_version", nil); v != 1 {
		t.Fatalf("cellbridge_rules_version %v at start, want 1", v)
	}

	nc, err := nats.Connect(b.natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var pubMu sync.Mutex
	published := map[string]string{} // event id → batch
	poison := 0
	publish := func(batch string, i int) {
		msg, id, poisonous := event(batch, i)
		if _, err := js.PublishMsg(ctx, msg); err != nil {
			t.Errorf("publish %s: %v", id, err)
			return
		}
		pubMu.Lock()
		defer pubMu.Unlock()
		if poisonous {
			poison++
		} else {
			published[id] = batch
		}
	}
	for i := range 200 {
		publish("before", i)
	}

	// Events keep flowing while the rules change underneath.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 300 {
			publish("during", i)
		}
	}()
	atomicWrite(t, b.rulesDir, withVersion(t, rules, 2, ""))
	b.eventually(t, 30*time.Second, "rules version 2 after the ..data swap", func() (bool, string) {
		v := b.metric(t, "cellbridge_rules_version", nil)
		return v == 2, fmt.Sprint("version ", v)
	})
	// A broken update, then a lower version: both refused, version 2 stays.
	atomicWrite(t, b.rulesDir, withVersion(t, rules, 3, "\nnotAField: true\n"))
	b.eventually(t, 30*time.Second, "the invalid update to be refused", func() (bool, string) {
		f := b.metric(t, "cellbridge_rules_reload_failures_total", nil)
		return f == 1, fmt.Sprint("failures ", f)
	})
	atomicWrite(t, b.rulesDir, withVersion(t, rules, 1, ""))
	b.eventually(t, 30*time.Second, "the lower version to be refused", func() (bool, string) {
		f := b.metric(t, "cellbridge_rules_reload_failures_total", nil)
		return f == 2, fmt.Sprint("failures ", f)
	})
	wg.Wait()
	if v := b.metric(t, "cellbridge_rules_version", nil); v != 2 {
		t.Fatalf("cellbridge_rules_version %v after refused updates, want 2", v)
	}
	for i := range 100 {
		publish("after", i)
	}
	if t.Failed() {
		t.FailNow()
	}

	want := float64(len(published))
	b.eventually(t, time.Minute, "every event forwarded or dead-lettered", func() (bool, string) {
		mf := b.scrape(t)
		fwd := sum(mf, "cellbridge_messages_total", map[string]string{"outcome": "forwarded"})
		dlq := sum(mf, "cellbridge_dlq_total", nil)
		return fwd == want && dlq == float64(poison), fmt.Sprintf("forwarded %v of %v, dlq %v of %d", fwd, want, dlq, poison)
	})

	// What arrived in the cells: every event exactly once, stamped with the rules version that routed it.
	seen := map[string]int{}
	names := js.StreamNames(ctx)
	for name := range names.Name() {
		if !strings.HasPrefix(name, "CELL_") {
			continue
		}
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		info, err := s.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
			m, err := s.GetMsg(ctx, seq)
			if err != nil {
				t.Fatalf("%s seq %d: %v", name, seq, err)
			}
			var ev struct{ ID string }
			if err := json.Unmarshal(m.Data, &ev); err != nil {
				t.Fatalf("%s seq %d: %v", name, seq, err)
			}
			seen[ev.ID]++
			v := m.Header.Get("Cell-Rules-Version")
			if published[ev.ID] == "after" && v != "2" || v != "1" && v != "2" {
				t.Errorf("event %s (%s) carries Cell-Rules-Version %q", ev.ID, published[ev.ID], v)
			}
			if cell := strings.ToLower(strings.TrimPrefix(name, "CELL_")); m.Header.Get("Cell-Name") != cell {
				t.Errorf("event %s in %s has Cell-Name %q", ev.ID, name, m.Header.Get("Cell-Name"))
			}
		}
	}
	if err := names.Err(); err != nil {
		t.Fatal(err)
	}
	for id := range published {
		if seen[id] != 1 {
			t.Errorf("event %s arrived %d times", id, seen[id])
		}
	}
	if len(seen) != len(published) {
		t.Errorf("%d distinct events in the cells, %d published", len(seen), len(published))
	}

	// A cell's stream disappears: publishing to it fails and is retried (never dead-lettered) until the
	// stream is back. This also makes the bridge serve cellbridge_sink_publish_errors_total, whose series
	// exist only once a publish failed.
	cell, err := js.Stream(ctx, "CELL_RZ00")
	if err != nil {
		t.Fatal(err)
	}
	info, err := cell.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := js.DeleteStream(ctx, "CELL_RZ00"); err != nil {
		t.Fatal(err)
	}
	publish("sinkfail", 4) // shard 4: owned by rz00
	b.eventually(t, 30*time.Second, "a failed publish to the missing cell stream", func() (bool, string) {
		n := b.metric(t, "cellbridge_sink_publish_errors_total", nil)
		return n > 0, fmt.Sprint("errors ", n)
	})
	if _, err := js.CreateStream(ctx, info.Config); err != nil {
		t.Fatal(err)
	}
	b.eventually(t, 30*time.Second, "the retried event forwarded once the stream is back", func() (bool, string) {
		mf := b.scrape(t)
		fwd := sum(mf, "cellbridge_messages_total", map[string]string{"outcome": "forwarded"})
		dlq := sum(mf, "cellbridge_dlq_total", nil)
		return fwd == want+1 && dlq == float64(poison), fmt.Sprintf("forwarded %v, dlq %v", fwd, dlq)
	})

	// One broadcast event (production's prices rule): a copy into every cell, and the per-cell
	// broadcast series the alerts read.
	if _, ok := rules["prices.yaml"]; ok {
		pm := &nats.Msg{Subject: "prices.updated", Header: nats.Header{"X-Price-List": {"pl-1"}}, Data: []byte(`{"id":"pl-1"}`)}
		if _, err := js.PublishMsg(ctx, pm); err != nil {
			t.Fatal(err)
		}
		b.eventually(t, 30*time.Second, "the broadcast event copied into every cell", func() (bool, string) {
			n := b.metric(t, "cellbridge_forwarded_total", map[string]string{"rule": "prices"})
			return n == 4, fmt.Sprint("copies ", n) // rz00, rz01, rz10, gz00
		})
	}

	checkLiveMetricNames(t, b.scrape(t))
	checkReloadAlertFires(t, 0, b.metric(t, "cellbridge_rules_reload_failures_total", nil))

	// The bridge has pipeline.drainTimeout (20s by default) after SIGTERM, and the Deployment grants
	// terminationGracePeriodSeconds minus the preStop pause.
	c := container(t, r)
	grace := time.Duration(*r.deployment.Spec.Template.Spec.TerminationGracePeriodSeconds)*time.Second -
		time.Duration(c.Lifecycle.PreStop.Sleep.Seconds)*time.Second
	b.stop(t, grace)
}

// checkLiveMetricNames: every metric the alerts and the dashboard read is served by the running
// bridge, and the bridge serves no cellbridge_ metric that bridge.MetricList does not list.
func checkLiveMetricNames(t *testing.T, mf map[string]*dto.MetricFamily) {
	t.Helper()
	live := map[string]bool{"up": true}
	for name, f := range mf {
		live[name] = true
		if f.GetType() == dto.MetricType_HISTOGRAM {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				live[name+s] = true
			}
		}
		if strings.HasPrefix(name, "cellbridge_") && !exportedMetrics(t)[name] {
			t.Errorf("/metrics serves %s, which bridge.MetricList does not list", name)
		}
	}
	used := map[string]string{}
	for _, a := range alerts(loadAlertRules(t)) {
		for _, m := range promqlMetrics(a.Expr) {
			used[m] = "alert " + a.Alert
		}
	}
	for _, p := range loadDashboard(t).allPanels() {
		for _, tg := range p.Targets {
			for _, m := range promqlMetrics(tg.Expr) {
				used[m] = "dashboard panel " + p.Title
			}
		}
	}
	for m, where := range used {
		if !live[m] && onlyWhile[m] == "" {
			t.Errorf("%s reads %s, which the running bridge does not serve", where, m)
		}
	}
}

// onlyWhile lists the metrics whose series exist only while a condition holds, which this run does
// not bring about; bridge tests cover them (bridge/held_test.go), and TestDashboard checks their names.
var onlyWhile = map[string]string{
	"cellbridge_held_range_messages":           "a series per blocked: shard range with parked messages",
	"cellbridge_held_range_oldest_age_seconds": "a series per blocked: shard range with parked messages",
}

// checkReloadAlertFires feeds the reload-failure counter values scraped before and after the refused
// updates to promtool with the real alert rules, and expects CellbridgeRulesReloadFailed to fire.
func checkReloadAlertFires(t *testing.T, before, after float64) {
	t.Helper()
	var alert rule
	for _, a := range alerts(loadAlertRules(t)) {
		if a.Alert == "CellbridgeRulesReloadFailed" {
			alert = a
		}
	}
	lbl := map[string]string{"namespace": "live", "pod": "bridge"}
	ann := map[string]string{}
	for k, v := range alert.Annotations {
		for name, val := range lbl {
			v = strings.ReplaceAll(v, "{{ $labels."+name+" }}", val)
		}
		ann[k] = v
	}
	expLabels := map[string]string{"namespace": "live", "pod": "bridge"}
	for k, v := range alert.Labels {
		expLabels[k] = v
	}
	abs, err := filepath.Abs(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	test := map[string]any{
		"rule_files":          []string{abs},
		"evaluation_interval": "1m",
		"tests": []any{map[string]any{
			"interval": "1m",
			"input_series": []any{map[string]any{
				"series": `cellbridge_rules_reload_failures_total{namespace="live",pod="bridge"}`,
				"values": fmt.Sprintf("%v %vx20", before, after),
			}},
			"alert_rule_test": []any{
				map[string]any{"eval_time": "0m", "alertname": alert.Alert, "exp_alerts": []any{}},
				map[string]any{"eval_time": "2m", "alertname": alert.Alert, "exp_alerts": []any{
					map[string]any{"exp_labels": expLabels, "exp_annotations": ann},
				}},
			},
		}},
	}
	runPromtool(t, "test", "rules", writeYAML(t, "reload_test.yaml", test))
}
