package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
)

// runSpec is one measured run in the production topology.
type runSpec struct {
	// Variant is the variant run; Label names the run in the output and
	// results (Variant, or VARIANT~NAME for a differently tuned copy of
	// it, e.g. B~fetch4096 with -tune B~fetch4096:fetch=4096).
	Variant string
	Label   string
	N       int
	Round   int
	// Rate > 0: a latency run, the paced producer in this process offering
	// Rate msg/s while the variant runs; else the events are stored in
	// ORDERS before the variant starts and throughput is timed.
	Rate float64
	Tune string
	// Profile, when set, is a file prefix: CPU profiles of the server and
	// of every variant process over ProfileSeconds from the start of
	// timing go to PREFIX-<variant>-<process>.pprof.
	Profile        string
	ProfileSeconds float64
	// ConsumerTrace, when set, is a file prefix: every poll of the timed
	// phase also records ORDERS' consumers (delivered and ack floor
	// sequences, acks pending, waiting pull requests, messages not yet
	// delivered) in PREFIX-<variant>-r<round>.tsv.
	ConsumerTrace string
	// TraceSeconds > 0 (with Profile): also an execution trace of each
	// variant process over that long, PREFIX-<variant>-r<round>-<process>.trace.
	TraceSeconds float64
	// Timeline, when set, is a file prefix: each bridge replica's
	// /debug/timeline over the run (one in TimelineEvery messages) goes
	// to PREFIX-<variant>[-<rate>]-<replica>.json.
	Timeline      string
	TimelineEvery int
}

// label is the run's name in the output and results.
func (s runSpec) label() string {
	if s.Label != "" {
		return s.Label
	}
	return s.Variant
}

// newSpec is the spec of a run of v (a variant, or VARIANT~NAME) with v's
// tuning.
func newSpec(v string, tune map[string]string) runSpec {
	base, _, _ := strings.Cut(v, "~")
	return runSpec{Variant: base, Label: v, Tune: tune[v]}
}

// harness is what every run shares: the binaries, the rules, the stored
// event templates.
type harness struct {
	cfg       config
	bridgeBin string
	self      string
	root      string // working directory of all runs (removed at the end)
	rules     string
	table     *cellTable
	templates map[string]string
	hc        *http.Client
	log       io.Writer
}

func newHarness(cfg config, log io.Writer) (*harness, error) {
	rules, err := filepath.Abs(cfg.rules)
	if err != nil {
		return nil, err
	}
	table, err := loadCellTable(rules)
	if err != nil {
		return nil, err
	}
	if err := checkRulesAgainstRouter(rules); err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	root, err := os.MkdirTemp("", "cellbridge-bench-")
	if err != nil {
		return nil, err
	}
	h := &harness{cfg: cfg, self: self, root: root, rules: rules, table: table, templates: map[string]string{},
		hc: &http.Client{Timeout: 5 * time.Minute}, log: log}
	if h.bridgeBin, err = buildBridge(root); err != nil {
		os.RemoveAll(root)
		return nil, err
	}
	if _, err := natstest.BuildServer(); err != nil {
		os.RemoveAll(root)
		return nil, err
	}
	return h, nil
}

func (h *harness) close() { os.RemoveAll(h.root) }

// isBridge tells the variants that run the real cellbridge binary.
func isBridge(v string) bool {
	switch v {
	case "B", "C", "O", "B" + bcSuffix, "R-B", "R-C":
		return true
	}
	return partitionedVariants[v] > 0
}

// replicasOf is the number of bridge processes of a variant.
func replicasOf(v, tune string) int {
	if n, err := strconv.Atoi(parseTune(tune)["replicas"]); err == nil && n > 0 {
		return n // an experiment: -tune O~r1:replicas=1 (no standby)
	}
	if v == "O" || partitionedVariants[v] > 0 {
		return 2
	}
	return 1
}

// partitionsOf is the partition count of a variant's rule (P, P2; 0 else).
func partitionsOf(v, tune string) int {
	e := &env{spec: childSpec{Variant: v}, tune: parseTune(tune)}
	return e.partitions()
}

// template returns the directory of a stopped server whose store holds n
// events in ORDERS (keyed subjects and the partition transform for
// parts > 0) and the empty cell and DLQ streams, making it on first use.
// Each run copies it: a fresh server per run without pre-publishing
// 200,000 events every time.
func (h *harness) template(n, parts int) (string, error) {
	key := fmt.Sprintf("n%d-p%d", n, parts)
	if d, ok := h.templates[key]; ok {
		return d, nil
	}
	dir := filepath.Join(h.root, "template-"+key)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	srv, err := natstest.StartProcess(natstest.ProcessOptions{Dir: dir})
	if err != nil {
		return "", err
	}
	defer srv.Kill()
	nc, err := nats.Connect(srv.URL)
	if err != nil {
		return "", err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := createStreams(ctx, js, h.table, 0, parts); err != nil {
		return "", err
	}
	if err := prePublish(ctx, js, genEvents(n, h.cfg.seed), parts > 0); err != nil {
		return "", err
	}
	nc.Close()
	if err := srv.Stop(); err != nil {
		return "", err
	}
	h.templates[key] = dir
	return dir, nil
}

// jsz is the part of the server's /jsz the harness reads.
type jsz struct {
	Accounts []struct {
		Streams []struct {
			Name  string `json:"name"`
			State struct {
				Msgs uint64 `json:"messages"`
			} `json:"state"`
			Consumers []consumerState `json:"consumer_detail"`
		} `json:"stream_detail"`
	} `json:"account_details"`
}

// consumerState is what /jsz says of one consumer of ORDERS.
type consumerState struct {
	Name      string `json:"name"`
	Delivered struct {
		Stream uint64 `json:"stream_seq"`
	} `json:"delivered"`
	AckFloor struct {
		Stream uint64 `json:"stream_seq"`
	} `json:"ack_floor"`
	NumAckPending int    `json:"num_ack_pending"`
	NumWaiting    int    `json:"num_waiting"`
	NumPending    uint64 `json:"num_pending"`
}

// serverState reads the stream states of the run's server (one HTTP
// request to its monitoring port, cheaper for the server than a JetStream
// API request per stream): the messages in the cell streams, in ORDERS,
// and ORDERS' consumer count.
func (h *harness) serverState(srv *natstest.Process, consumers bool) (cells, orders, nConsumers int, err error) {
	cells, orders, cs, err := h.serverStateEx(srv, consumers)
	return cells, orders, len(cs), err
}

// serverStateEx is serverState with ORDERS' consumers.
func (h *harness) serverStateEx(srv *natstest.Process, consumers bool) (cells, orders int, cs []consumerState, err error) {
	url := srv.MonitorURL + "/jsz?acc=$G&streams=true"
	if consumers {
		url += "&consumers=true"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := httpGet(ctx, h.hc, url)
	if err != nil {
		return 0, 0, nil, err
	}
	var z jsz
	if err := json.Unmarshal(b, &z); err != nil {
		return 0, 0, nil, fmt.Errorf("/jsz: %w", err)
	}
	for _, a := range z.Accounts {
		for _, s := range a.Streams {
			switch {
			case strings.HasPrefix(s.Name, "CELL_"):
				cells += int(s.State.Msgs)
			case s.Name == "ORDERS":
				orders = int(s.State.Msgs)
				cs = s.Consumers
			}
		}
	}
	return cells, orders, cs, nil
}

// cpuOf sums the CPU time of processes.
func cpuOf(pids ...int) time.Duration {
	var t time.Duration
	for _, pid := range pids {
		if d, err := procCPU(pid); err == nil {
			t += d
		}
	}
	return t
}

// runDir makes the working directory of one run (configuration files,
// logs, the server's store); the caller removes it.
func (h *harness) runDir(spec runSpec) (string, error) {
	return os.MkdirTemp(h.root, "run-"+strings.ReplaceAll(spec.label(), "~", "_")+"-")
}

// runNATS is one run of a NATS variant: fresh server, the variant's
// processes, timing, CPU of each process, verification.
func (h *harness) runNATS(spec runSpec) (*runResult, error) {
	began := time.Now()
	dir, err := h.runDir(spec)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	parts := partitionsOf(spec.Variant, spec.Tune)
	if spec.Rate <= 0 {
		tpl, err := h.template(spec.N, parts)
		if err != nil {
			return nil, fmt.Errorf("stored events: %w", err)
		}
		if out, err := exec.Command("cp", "-a", filepath.Join(tpl, "store"), filepath.Join(dir, "store")).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("copy the stored events: %v: %s", err, out)
		}
	}
	srvConf, profPort := "", 0
	if spec.Profile != "" {
		if profPort, err = freePort(); err != nil {
			return nil, err
		}
		srvConf = fmt.Sprintf("prof_port: %d", profPort)
	}
	srv, err := natstest.StartProcess(natstest.ProcessOptions{Dir: dir, Config: srvConf})
	if err != nil {
		return nil, err
	}
	defer srv.Kill()
	nc, err := nats.Connect(srv.URL)
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	var events []event
	if spec.Rate > 0 {
		if err := createStreams(ctx, js, h.table, 0, parts); err != nil {
			return nil, err
		}
		events = genEvents(spec.N, h.cfg.seed)
	} else if _, orders, _, err := h.serverState(srv, false); err != nil || orders != spec.N {
		return nil, fmt.Errorf("the copied store holds %d events, want %d (%v)", orders, spec.N, err)
	}

	procs, settings, err := h.startVariant(dir, srv, spec)
	defer func() {
		for _, p := range procs {
			p.kill()
		}
	}()
	if err != nil {
		return nil, err
	}
	want := spec.N * copiesPerEvent(spec.Variant, h.table)
	pids := make([]int, len(procs))
	for i, p := range procs {
		pids[i] = p.pid()
	}

	var t0 time.Time
	var before int
	var cpuSrv0, cpuVar0, cpuSelf0 time.Duration
	var ioSrv0, ioVar0 procIO
	startTiming := func(count int) {
		t0, before = time.Now(), count
		cpuSrv0, cpuVar0, cpuSelf0 = cpuOf(srv.Pid()), cpuOf(pids...), cpuOf(os.Getpid())
		ioSrv0, ioVar0 = readProcIO(srv.Pid()), readProcIO(pids...)
		resetPeakRSSOf(srv.Pid())
		for _, pid := range pids {
			resetPeakRSSOf(pid)
		}
	}
	var side sync.WaitGroup
	var sideErrs []error
	var sideMu sync.Mutex
	sideErr := func(err error) {
		sideMu.Lock()
		sideErrs = append(sideErrs, err)
		sideMu.Unlock()
	}
	startSide := func(expect time.Duration) {
		if spec.Profile != "" {
			side.Go(func() {
				if err := h.profile(spec, srv, profPort, procs); err != nil {
					sideErr(err)
				}
			})
		}
		if spec.Timeline != "" {
			side.Go(func() {
				if err := h.timeline(spec, procs, expect); err != nil {
					sideErr(err)
				}
			})
		}
	}

	vctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var prodErr chan error
	if spec.Rate > 0 {
		if err := h.waitConsuming(srv, js, &events[0], parts > 0, spec, procs); err != nil {
			return nil, err
		}
		startTiming(1)
		startSide(time.Duration(float64(spec.N)/spec.Rate*float64(time.Second)) + time.Second)
		prodErr = make(chan error, 1)
		go func() { prodErr <- pacedPublish(vctx, srv.URL, events[1:], spec.Rate, parts > 0) }()
	}
	deadline := time.Now().Add(time.Duration(want/1000+120) * time.Second)
	var count, last int
	lastChange := time.Now()
	var ctrace *os.File
	if spec.ConsumerTrace != "" {
		if ctrace, err = os.Create(fmt.Sprintf("%s-%s-r%d.tsv", spec.ConsumerTrace, spec.label(), spec.Round)); err != nil {
			return nil, err
		}
		defer ctrace.Close()
		fmt.Fprintln(ctrace, "ms\tcells\tconsumer\tdelivered_seq\tack_floor_seq\tack_pending\twaiting_pulls\tpending")
	}
	for {
		c, _, cs, err := h.serverStateEx(srv, ctrace != nil)
		if err != nil {
			return nil, err
		}
		count = c
		if ctrace != nil && !t0.IsZero() {
			for _, x := range cs {
				fmt.Fprintf(ctrace, "%.0f\t%d\t%s\t%d\t%d\t%d\t%d\t%d\n", float64(time.Since(t0).Microseconds())/1e3, c, x.Name,
					x.Delivered.Stream, x.AckFloor.Stream, x.NumAckPending, x.NumWaiting, x.NumPending)
			}
		}
		if t0.IsZero() && count > 0 {
			startTiming(count)
			startSide(0)
		}
		if count >= want {
			break
		}
		if count != last {
			last, lastChange = count, time.Now()
		} else if time.Since(lastChange) > 20*time.Second || time.Now().After(deadline) {
			break // verification reports what is missing
		}
		for _, p := range procs {
			if p.exited() {
				return nil, fmt.Errorf("%s exited during the run (%v):\n%s", p.name, p.err, natstest.Tail(p.log, 30))
			}
		}
		select {
		case err := <-prodErr:
			if err != nil {
				return nil, fmt.Errorf("paced producer: %w", err)
			}
			prodErr = nil
		default:
		}
		time.Sleep(pollEvery)
	}
	t1 := time.Now()
	cpuSrv1, cpuVar1, cpuSelf1 := cpuOf(srv.Pid()), cpuOf(pids...), cpuOf(os.Getpid())
	ioSrv1, ioVar1 := readProcIO(srv.Pid()), readProcIO(pids...)
	var peakVar float64
	for _, pid := range pids {
		peakVar = max(peakVar, procStatusMB(pid, "VmHWM:"))
	}
	peakSrv := procStatusMB(srv.Pid(), "VmHWM:")
	side.Wait()
	// Late duplicates would arrive within moments.
	time.Sleep(300 * time.Millisecond)
	cancel()
	outcomes := h.outcomes(procs)
	var stopErrs []error
	for _, p := range procs {
		if err := p.stop(40 * time.Second); err != nil {
			stopErrs = append(stopErrs, err)
		}
	}
	if err := errors.Join(stopErrs...); err != nil {
		return nil, err
	}
	if s, err := readOutcome(dir); err == nil && s != "" {
		settings = s
	}
	if t0.IsZero() {
		t0, before = t1, 0
	}
	n := max(count-before, 1)
	res := &childResult{
		Variant:   spec.label(),
		N:         spec.N,
		Seconds:   t1.Sub(t0).Seconds(),
		PeakRSSMB: peakVar,
		Settings:  settings + outcomes,
		CPUus:     float64(cpuVar1-cpuVar0) / 1e3 / float64(n),
		Extra:     map[string]any{},
	}
	res.MsgsPerS = float64(count-before) / float64(want/spec.N) / max(res.Seconds, 1e-9)
	res.Extra["server_cpu_us_per_msg"] = float64(cpuSrv1-cpuSrv0) / 1e3 / float64(n)
	res.Extra["bench_cpu_us_per_msg"] = float64(cpuSelf1-cpuSelf0) / 1e3 / float64(n)
	res.Extra["server_peak_rss_mb"] = peakSrv
	res.Extra["server_reads_per_msg"] = float64(ioSrv1.reads-ioSrv0.reads) / float64(n)
	res.Extra["server_writes_per_msg"] = float64(ioSrv1.writes-ioSrv0.writes) / float64(n)
	res.Extra["process_reads_per_msg"] = float64(ioVar1.reads-ioVar0.reads) / float64(n)
	res.Extra["process_writes_per_msg"] = float64(ioVar1.writes-ioVar0.writes) / float64(n)
	res.Extra["timed_msgs"] = count - before
	e := &env{table: h.table, spec: childSpec{Variant: spec.Variant, N: spec.N, Rate: spec.Rate}}
	if kvWritesOf(spec.Variant) > 0 {
		e.kvBucket = kvRefBucket
	}
	vctx2, cancel2 := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel2()
	if want > spec.N {
		err = verifyBroadcast(vctx2, js, e, res)
	} else {
		err = verify(vctx2, js, e, res)
	}
	if err != nil {
		return nil, err
	}
	nc.Close()
	if err := srv.Stop(); err != nil {
		return nil, err
	}
	if err := errors.Join(sideErrs...); err != nil {
		res.VerifyNote = strings.TrimPrefix(res.VerifyNote+"; "+err.Error(), "; ")
	}
	return &runResult{childResult: *res, Round: spec.Round, LoadAvg: loadAvg(), Offered: spec.Rate, WallSeconds: time.Since(began).Seconds()}, nil
}

// readOutcome reads the settings a variant process wrote at exit.
func readOutcome(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, "outcome.json"))
	if err != nil {
		return "", err
	}
	var o procOutcome
	if err := json.Unmarshal(b, &o); err != nil {
		return "", err
	}
	return o.Settings, nil
}

// startVariant starts the variant's processes: bridge replicas (the
// cellbridge binary with a configuration file, started together as a
// rollout's pods are) or one loop (this binary with -variant-proc). It
// returns them with a description of the settings.
func (h *harness) startVariant(dir string, srv *natstest.Process, spec runSpec) ([]*proc, string, error) {
	debug := spec.Profile != "" || spec.Timeline != ""
	if !isBridge(spec.Variant) {
		ps := procSpec{Variant: spec.Variant, URL: srv.URL, Rules: h.rules, Tune: spec.Tune}
		if spec.Variant == "A-hdrs" {
			ps.Variant, ps.Tune = "A", strings.Trim(spec.Tune+",cellhdrs=1", ",")
		}
		var httpURL string
		if debug {
			port, err := freePort()
			if err != nil {
				return nil, "", err
			}
			ps.Pprof = fmt.Sprintf("127.0.0.1:%d", port)
			httpURL = "http://" + ps.Pprof
		}
		b, _ := json.Marshal(ps)
		p, err := startProcEnv(spec.Variant, filepath.Join(dir, "variant.log"), envOf(spec.Tune), h.self, "-variant-proc", string(b), "-child-out", filepath.Join(dir, "outcome.json"))
		if err != nil {
			return nil, "", err
		}
		p.http = httpURL
		if httpURL != "" {
			if err := p.waitHTTP(h.hc, "/healthz", 30*time.Second); err != nil {
				return []*proc{p}, "", err
			}
		}
		return []*proc{p}, "", nil
	}
	rules, mode, err := h.variantRules(dir, spec)
	if err != nil {
		return nil, "", err
	}
	store := "memory"
	if spec.Variant == "C" {
		// The check-then-commit protocol (one KV write per message; opt-in,
		// for a bucket of one replica as here); -tune C:protocol=reserve
		// measures the default protocol.
		proto := parseTune(spec.Tune)["protocol"]
		if proto == "" {
			proto = "check"
		}
		store = "jetstream, protocol: " + proto
	}
	var procs []*proc
	for i := range replicasOf(spec.Variant, spec.Tune) {
		port, err := freePort()
		if err != nil {
			return procs, "", err
		}
		cfg := bridgeConfig(rules, fmt.Sprintf("nats: {type: nats, url: %q}", srv.URL), store, port, debug, parseTune(spec.Tune))
		name := fmt.Sprintf("%s-r%d", spec.Variant, i+1)
		path := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
			return procs, "", err
		}
		p, err := startProcEnv(name, filepath.Join(dir, name+".log"), envOf(spec.Tune), h.bridgeBin, "run", "-config", path)
		if err != nil {
			return procs, "", err
		}
		p.http = fmt.Sprintf("http://127.0.0.1:%d", port)
		procs = append(procs, p)
	}
	for _, p := range procs {
		if err := p.waitHTTP(h.hc, "/healthz", 30*time.Second); err != nil {
			return procs, "", err
		}
	}
	tune := ""
	if spec.Tune != "" {
		tune = " tune " + spec.Tune
	}
	return procs, fmt.Sprintf("cellbridge run (%d process(es)), %s, dedupe %s, configuration defaults%s", len(procs), mode, store, tune), nil
}

// envOf is the environment of a variant's processes (bridges and the
// variant child): this process's, plus
// NAME=VALUE for each tuning key env=NAME:VALUE (experiments with settings
// that have no configuration field, such as GOGC or GOMAXPROCS).
func envOf(tune string) []string {
	var extra []string
	for _, kv := range strings.Split(tune, ",") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(kv), "env="); ok {
			name, val, _ := strings.Cut(v, ":")
			extra = append(extra, name+"="+val)
		}
	}
	if extra == nil {
		return nil
	}
	return append(os.Environ(), extra...)
}

// bridgeConfig is the configuration file of one bridge replica: the
// brokers section's broker line, the dedupe section's fields after
// `store:` (the store, and for C its protocol), HTTP on port (with
// pprof for profiled runs), the pipeline tuning (inflight, fetch,
// workers, lanes), everything else the defaults.
func bridgeConfig(rules, broker, store string, port int, pprof bool, tune map[string]string) string {
	var pipeline []string
	for _, t := range []struct{ tune, field string }{{"inflight", "maxInFlight"}, {"fetch", "fetchBatch"}, {"workers", "workers"}, {"lanes", "lanes"}} {
		if v, ok := tune[t.tune]; ok {
			pipeline = append(pipeline, fmt.Sprintf("%s: %s", t.field, v))
		}
	}
	return fmt.Sprintf("rules: %q\nbrokers:\n  %s\ndedupe: {store: %s}\nhttp: {listen: \"127.0.0.1:%d\", pprof: %v}\npipeline: {%s}\nlog: {level: info, format: json}\n",
		rules, broker, store, port, pprof, strings.Join(pipeline, ", "))
}

// variantRules writes the variant's rules into a directory under dir (see
// variantRules; B-bc's broadcast rule).
func (h *harness) variantRules(dir string, spec runSpec) (string, string, error) {
	if spec.Variant == "B"+bcSuffix {
		r, err := broadcastRules(h.rules, h.table.cells, dir)
		return r, "broadcast rule to " + strings.Join(h.table.cells, ", ") + " (ordered source, the default)", err
	}
	return variantRules(&env{spec: childSpec{Variant: spec.Variant, Rules: h.rules}, tune: parseTune(spec.Tune)}, dir)
}

// waitConsuming waits before a latency run's load starts until the
// variant forwards: it publishes the run's first event (without a
// publish-time stamp, so it is not a latency sample) and waits until a cell
// stream holds it. By then the bridge's sources run (an ordered replica has
// won the pin, which it does with the first message) and every connection
// is warm, so that start-up is not counted as latency.
func (h *harness) waitConsuming(srv *natstest.Process, js jetstream.JetStream, first *event, keyed bool, spec runSpec, procs []*proc) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	m := &nats.Msg{Subject: subjectOf(first, keyed), Data: first.body, Header: nats.Header{nats.MsgIdHdr: []string{first.id}}}
	if _, err := js.PublishMsg(ctx, m); err != nil {
		return fmt.Errorf("warm-up event: %w", err)
	}
	for {
		cells, _, _, err := h.serverState(srv, false)
		if err != nil {
			return err
		}
		if cells > 0 {
			time.Sleep(200 * time.Millisecond)
			return nil
		}
		for _, p := range procs {
			if p.exited() {
				return fmt.Errorf("%s exited while starting (%v):\n%s", p.name, p.err, natstest.Tail(p.log, 30))
			}
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: the warm-up event was not forwarded within 60s", spec.label())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// outcomes scrapes cellbridge_messages_total of each bridge replica:
// " [r1: forwarded=N ...]".
func (h *harness) outcomes(procs []*proc) string {
	var out strings.Builder
	for _, p := range procs {
		if p.http == "" || !strings.Contains(p.name, "-r") {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		b, err := httpGet(ctx, h.hc, p.http+"/metrics")
		cancel()
		if err != nil {
			continue
		}
		fmt.Fprintf(&out, " [%s:", p.name)
		for line := range strings.SplitSeq(string(b), "\n") {
			rest, ok := strings.CutPrefix(line, bridge.MetricMessages+"{")
			if !ok {
				continue
			}
			_, o, _ := strings.Cut(rest, `outcome="`)
			o, _, _ = strings.Cut(o, `"`)
			_, v, _ := strings.Cut(rest, "} ")
			if v != "0" {
				fmt.Fprintf(&out, " %s=%s", o, v)
			}
		}
		out.WriteString("]")
	}
	return out.String()
}

// profile takes CPU profiles of the server and of every variant process
// at once, over spec.ProfileSeconds.
func (h *harness) profile(spec runSpec, srv *natstest.Process, profPort int, procs []*proc) error {
	sec := max(spec.ProfileSeconds, 1)
	type target struct{ name, url string }
	ts := []target{{"server", fmt.Sprintf("http://127.0.0.1:%d", profPort)}}
	for _, p := range procs {
		if p.http != "" {
			ts = append(ts, target{p.name, p.http})
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 2*len(ts))
	for i, t := range ts {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(sec+30)*time.Second)
			defer cancel()
			b, err := httpGet(ctx, h.hc, fmt.Sprintf("%s/debug/pprof/profile?seconds=%g", t.url, sec))
			if err == nil {
				err = os.WriteFile(fmt.Sprintf("%s-%s-r%d-%s.pprof", spec.Profile, spec.label(), spec.Round, t.name), b, 0o644)
			}
			if err != nil {
				errs[i] = fmt.Errorf("profile of %s: %w", t.name, err)
			}
		})
		// An execution trace of the variant's processes (goroutine
		// scheduling, blocking, network waits) over the first second.
		if t.name != "server" && spec.TraceSeconds > 0 {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(spec.TraceSeconds+30)*time.Second)
				defer cancel()
				b, err := httpGet(ctx, h.hc, fmt.Sprintf("%s/debug/pprof/trace?seconds=%g", t.url, spec.TraceSeconds))
				if err == nil {
					err = os.WriteFile(fmt.Sprintf("%s-%s-r%d-%s.trace", spec.Profile, spec.label(), spec.Round, t.name), b, 0o644)
				}
				if err != nil {
					errs[len(ts)+i] = fmt.Errorf("trace of %s: %w", t.name, err)
				}
			})
		}
	}
	wg.Wait()
	return errors.Join(errs...)
}

// timeline records /debug/timeline of each bridge replica for the run
// (expect: its expected length; 0: ProfileSeconds) and writes the reports.
func (h *harness) timeline(spec runSpec, procs []*proc, expect time.Duration) error {
	if !isBridge(spec.Variant) {
		return nil
	}
	sec := expect.Seconds()
	if sec <= 0 {
		sec = max(spec.ProfileSeconds, 1)
	}
	sec = min(sec, bridge.MaxTimelineDuration.Seconds())
	every := max(spec.TimelineEvery, 1)
	var wg sync.WaitGroup
	errs := make([]error, len(procs))
	for i, p := range procs {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(sec+30)*time.Second)
			defer cancel()
			b, err := httpGet(ctx, h.hc, fmt.Sprintf("%s/debug/timeline?seconds=%g&every=%d", p.http, sec, every))
			if err == nil {
				name := spec.label()
				if spec.Rate > 0 {
					name = fmt.Sprintf("%s-%.0f", name, spec.Rate)
				}
				err = os.WriteFile(fmt.Sprintf("%s-%s-%s.json", spec.Timeline, name, p.name), b, 0o644)
			}
			if err != nil {
				errs[i] = fmt.Errorf("timeline of %s: %w", p.name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// runRMQ is one run of the RocketMQ comparison: the in-process broker of
// internal/rmqtest in this process (its CPU is this process's), R-A the
// bare client loop as its own process, R-B the cellbridge binary with a
// rocketmq broker and the memory store, R-C the same with transactional
// sends (`exactlyOnce: transactional`) and the JetStream KV store on a
// nats-server process of its own (the store RocketMQ targets need across
// replicas; its CPU is counted with the broker's); events pre-published,
// timing until the cell topics hold N, every message verified.
func (h *harness) runRMQ(spec runSpec) (*runResult, error) {
	dir, err := h.runDir(spec)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	began := time.Now()
	rules, err := filepath.Abs(h.cfg.rmqRules)
	if err != nil {
		return nil, err
	}
	table, err := loadCellTable(rules)
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	b := rmqtest.New(rmqtest.Options{MaxSuspend: time.Second})
	if err := b.Start(ctx); err != nil {
		return nil, err
	}
	defer func() { _ = b.Close(context.Background()) }()
	if err := b.CreateTopic("orders", 4); err != nil {
		return nil, err
	}
	for _, c := range table.cells {
		if err := b.CreateTopic(rmqCellTopic(c), 4); err != nil {
			return nil, err
		}
	}
	ns := b.NameServerAddr()
	if err := rmqPrePublish(ctx, ns, genEvents(spec.N, h.cfg.seed)); err != nil {
		return nil, err
	}
	count := func() int {
		n := 0
		for _, c := range table.cells {
			for _, o := range b.QueueOffsets(rmqCellTopic(c)) {
				n += int(o)
			}
		}
		return n
	}
	var p *proc
	var kvSrv *natstest.Process
	settings := ""
	if spec.Variant == "R-C" {
		kvDir := filepath.Join(dir, "kv-server")
		if err := os.MkdirAll(kvDir, 0o755); err != nil {
			return nil, err
		}
		if kvSrv, err = natstest.StartProcess(natstest.ProcessOptions{Dir: kvDir}); err != nil {
			return nil, err
		}
		defer kvSrv.Kill()
	}
	serverCPU := func() time.Duration {
		d := cpuOf(os.Getpid())
		if kvSrv != nil {
			d += cpuOf(kvSrv.Pid())
		}
		return d
	}
	if spec.Variant == "R-A" {
		js, _ := json.Marshal(procSpec{Variant: "R-A", NS: ns, Rules: rules, Tune: spec.Tune})
		p, err = startProc("R-A", filepath.Join(dir, "variant.log"), h.self, "-variant-proc", string(js), "-child-out", filepath.Join(dir, "outcome.json"))
	} else {
		port, perr := freePort()
		if perr != nil {
			return nil, perr
		}
		broker, store := fmt.Sprintf("rmq: {type: rocketmq, nameservers: [%q], instancePrefix: bench}", ns), "memory"
		settings = "cellbridge run (1 process), rocketmq source and sink, dedupe memory, configuration defaults"
		if kvSrv != nil {
			broker = fmt.Sprintf("rmq: {type: rocketmq, nameservers: [%q], instancePrefix: bench, exactlyOnce: transactional}\n  nats: {type: nats, url: %q}", ns, kvSrv.URL)
			store = "jetstream"
			settings = "cellbridge run (1 process), rocketmq source and sink with exactlyOnce: transactional, dedupe jetstream (KV bucket on its own nats-server process, file storage), configuration defaults"
		}
		cfg := bridgeConfig(rules, broker, store, port, false, parseTune(spec.Tune))
		name := spec.Variant + "-r1"
		path := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
			return nil, err
		}
		p, err = startProc(name, filepath.Join(dir, name+".log"), h.bridgeBin, "run", "-config", path)
		if err == nil {
			p.http = fmt.Sprintf("http://127.0.0.1:%d", port)
		}
	}
	if err != nil {
		return nil, err
	}
	defer p.kill()
	var t0 time.Time
	var before int
	var cpuVar0, cpuSelf0 time.Duration
	deadline := time.Now().Add(time.Duration(spec.N/200+120) * time.Second)
	n, last := 0, 0
	lastChange := time.Now()
	for {
		n = count()
		if t0.IsZero() && n > 0 {
			t0, before = time.Now(), n
			cpuVar0, cpuSelf0 = cpuOf(p.pid()), serverCPU()
			resetPeakRSSOf(p.pid())
		}
		if n >= spec.N {
			break
		}
		if n != last {
			last, lastChange = n, time.Now()
		} else if time.Since(lastChange) > 30*time.Second || time.Now().After(deadline) {
			break
		}
		if p.exited() {
			return nil, fmt.Errorf("%s exited during the run (%v):\n%s", p.name, p.err, natstest.Tail(p.log, 30))
		}
		time.Sleep(pollEvery)
	}
	t1 := time.Now()
	cpuVar1, cpuSelf1 := cpuOf(p.pid()), serverCPU()
	peak := procStatusMB(p.pid(), "VmHWM:")
	time.Sleep(300 * time.Millisecond)
	outcomes := h.outcomes([]*proc{p})
	if err := p.stop(40 * time.Second); err != nil {
		return nil, err
	}
	if s, err := readOutcome(dir); err == nil && s != "" {
		settings = s
	}
	if t0.IsZero() {
		t0 = t1
	}
	timed := max(n-before, 1)
	res := &childResult{Variant: spec.label(), N: spec.N, Seconds: t1.Sub(t0).Seconds(), PeakRSSMB: peak,
		Settings: settings + outcomes, CPUus: float64(cpuVar1-cpuVar0) / 1e3 / float64(timed),
		Extra: map[string]any{"server_cpu_us_per_msg": float64(cpuSelf1-cpuSelf0) / 1e3 / float64(timed), "timed_msgs": n - before}}
	res.MsgsPerS = float64(n-before) / max(res.Seconds, 1e-9)
	tl := newTally(table, res, spec.N)
	for _, c := range table.cells {
		for _, m := range b.Messages(rmqCellTopic(c)) {
			tl.add(c, m.Body)
		}
	}
	notes := tl.notes("cell topics")
	res.Verified = len(notes) == 0
	res.VerifyNote = strings.Join(notes, "; ")
	return &runResult{childResult: *res, Round: spec.Round, LoadAvg: loadAvg(), WallSeconds: time.Since(began).Seconds()}, nil
}
