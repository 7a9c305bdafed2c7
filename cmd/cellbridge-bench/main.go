// Command cellbridge-bench measures cellbridge side by side with a bare
// nats.go consume → publish → ack pipe and with watermill, each on a fresh
// embedded nats-server with JetStream file storage, and writes
// bench/results.json. See `make bench` and `make soak`.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

type config struct {
	n           int
	rounds      int
	out         string
	variants    string
	soak        time.Duration
	soakRate    float64
	cpuprofile  string
	memprofile  bool
	seed        uint64
	rules       string
	tune        map[string]string
	latency     bool
	faults      bool
	faultN      int
	extra       bool
	refKV       bool
	latencyRate float64
	latRounds   int
	rmqN        int
	rmqRounds   int
	rmqRules    string
	bcN         int
	bcRounds    int
}

func main() {
	var (
		cfg       config
		childSpec string
		childOut  string
		tunes     multiFlag
	)
	flag.IntVar(&cfg.n, "n", 200000, "events per run")
	flag.IntVar(&cfg.rounds, "rounds", 3, "alternating rounds of the main variants (medians are reported)")
	flag.StringVar(&cfg.out, "out", "", "write results JSON here (e.g. bench/results.json)")
	flag.StringVar(&cfg.variants, "variants", "A,B,C,D,O,P", "main variants in run order: A pipe, B cellbridge (shared durable), C cellbridge+KV, D watermill, O cellbridge ordered (one active replica, one standby), P cellbridge partitioned (two replicas)")
	flag.DurationVar(&cfg.soak, "soak", 0, "soak mode: run B at half load for this long, report RSS and goroutines every minute")
	flag.Float64Var(&cfg.soakRate, "soak-rate", 0, "soak offered load in msg/s (default: 30% of pipe_msgs_per_s from bench/results.json, else 30000)")
	flag.StringVar(&cfg.cpuprofile, "cpuprofile", "", "write a CPU profile of the timed phase of each variant's first run (and of each reference run) to PREFIX-<variant>.pprof")
	flag.BoolVar(&cfg.memprofile, "memprofile", false, "with -cpuprofile: also write PREFIX-<variant>.allocs.pprof")
	flag.Uint64Var(&cfg.seed, "seed", 1, "event generation seed")
	flag.StringVar(&cfg.rules, "rules", "bench/rules", "rule directory (same for all variants)")
	flag.Var(&tunes, "tune", "variant tuning, VARIANT:k=v,k=v (repeatable), e.g. A:window=8000,mode=fetch")
	flag.BoolVar(&cfg.latency, "latency", true, "measure B's end-to-end latency at half of A's median rate")
	flag.BoolVar(&cfg.faults, "faults", true, "run the fault variants B-fault and D-fault")
	flag.Float64Var(&cfg.latencyRate, "latency-rate", 0, "offered load of the latency runs in msg/s (default: half of A's median)")
	flag.IntVar(&cfg.latRounds, "latency-rounds", 3, "alternating pipe/cellbridge pairs of latency runs at half load (medians are reported; the 30% load pair runs once)")
	flag.IntVar(&cfg.faultN, "fault-n", 0, "events for the fault runs (default -n)")
	flag.IntVar(&cfg.rmqN, "rmq-n", 20000, "events per RocketMQ run (the in-process broker and the client's synchronous sends are slower than JetStream)")
	flag.IntVar(&cfg.rmqRounds, "rmq-rounds", 3, "alternating rounds of the RocketMQ comparison (0: skip)")
	flag.StringVar(&cfg.rmqRules, "rmq-rules", "bench/rules-rmq", "rule directory of the RocketMQ comparison")
	flag.IntVar(&cfg.bcN, "bc-n", 50000, "events per broadcast run (each to 4 cells)")
	flag.IntVar(&cfg.bcRounds, "bc-rounds", 3, "alternating rounds of the broadcast comparison A-bc B-bc (0: skip)")
	flag.BoolVar(&cfg.extra, "ref-headers", true, "one extra run of the pipe sending cellbridge's Cell-* headers too (reference A-hdrs)")
	flag.BoolVar(&cfg.refKV, "ref-kv", true, "one run each of the pipe with per-message KV writes (references A-kv1: one atomic create in a bucket laid out as dedupe's, awaited before the cell publish; A-kv2: also an overwrite \"c\" after the cell PubAck, awaited before the source ack = the minimal loop of C's protocol); tune with -tune A-kv1:... / A-kv2:...")
	flag.StringVar(&childSpec, "child", "", "internal: run one variant in this process (JSON spec)")
	flag.StringVar(&childOut, "child-out", "", "internal: result file of -child")
	flag.Parse()
	cfg.tune = tunes.m

	if childSpec != "" {
		os.Exit(childMain(childSpec, childOut))
	}
	if cfg.soak > 0 {
		os.Exit(soakMain(cfg))
	}
	if err := benchMain(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "cellbridge-bench:", err)
		os.Exit(1)
	}
}

type multiFlag struct{ m map[string]string }

func (f *multiFlag) String() string { return fmt.Sprint(f.m) }
func (f *multiFlag) Set(s string) error {
	v, t, ok := strings.Cut(s, ":")
	if !ok {
		return fmt.Errorf("want VARIANT:k=v,...")
	}
	if f.m == nil {
		f.m = map[string]string{}
	}
	f.m[v] = t
	return nil
}

func childMain(specJSON, out string) int {
	var spec childSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	var res *childResult
	var err error
	if spec.Soak != "" {
		err = runSoak(spec)
		if err != nil {
			fmt.Fprintln(os.Stderr, "soak:", err)
			return 1
		}
		return 0
	}
	if strings.HasPrefix(spec.Variant, "R-") {
		res, err = runRMQChild(spec)
	} else {
		res, err = runChild(spec)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "child %s: %v\n", spec.Variant, err)
		return 1
	}
	if err := writeResult(out, res); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	return 0
}

// runResult is one child run as the parent sees it.
type runResult struct {
	childResult
	Round      int     `json:"round"`
	MaxRSSMB   float64 `json:"max_rss_mb_process"`           // getrusage of the child: whole life incl. pre-publish
	LoadAvg    string  `json:"load_avg_1m"`                  // machine load when the run ended (other work distorts msg/s)
	Offered    float64 `json:"offered_msgs_per_s,omitempty"` // latency runs
	WallSecond float64 `json:"wall_seconds"`
}

// spawn runs one variant in a child process (a re-exec of this binary) so
// that each run has a fresh server, its own heap and its own peak RSS.
func spawn(spec childSpec, logw io.Writer) (*runResult, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	b, _ := json.Marshal(spec)
	f, err := os.CreateTemp("", "cellbridge-bench-result-*.json")
	if err != nil {
		return nil, err
	}
	f.Close()
	defer os.Remove(f.Name())
	cmd := exec.Command(self, "-child", string(b), "-child-out", f.Name())
	cmd.Stdout = logw
	cmd.Stderr = logw
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("variant %s: %w", spec.Variant, err)
	}
	raw, err := os.ReadFile(f.Name())
	if err != nil {
		return nil, err
	}
	r := &runResult{WallSecond: time.Since(start).Seconds(), LoadAvg: loadAvg()}
	if err := json.Unmarshal(raw, &r.childResult); err != nil {
		return nil, err
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.MaxRSSMB = float64(ru.Maxrss) / 1024
	}
	return r, nil
}

// latencyOrder is the run order of rounds alternating pipe/cellbridge pairs.
func latencyOrder(rounds int) []string {
	var o []string
	for range rounds {
		o = append(o, "A", "B")
	}
	return o
}

// latencyMedian is the median of one latency percentile over runs.
func latencyMedian(rs []*runResult, pct string) float64 {
	var v []float64
	for _, r := range rs {
		if r.LatencyMS != nil {
			v = append(v, r.LatencyMS[pct])
		}
	}
	return median(v)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

var variantNames = map[string]string{
	"A":       "A  bare pipe (nats.go jetstream)",
	"B":       "B  cellbridge, memory dedupe, shared durable",
	"C":       "C  cellbridge, JetStream KV dedupe",
	"O":       "O  cellbridge ordered: 1 active + 1 standby",
	"P":       "P  cellbridge partitioned: 12 over 2 replicas",
	"D":       "D  watermill + watermill-nats",
	"B-fault": "B-fault  cellbridge, 1st attempt of every 1000th fails",
	"D-fault": "D-fault  watermill, 1st attempt of every 1000th fails",
	"R-A":     "R-A  RocketMQ bare client loop (push consumer, SendSync)",
	"R-B":     "R-B  RocketMQ cellbridge, memory dedupe",
	"A-hdrs":  "A-hdrs  bare pipe + the six Cell-* headers (reference, 1 run)",
	"A-kv1":   "A-kv1  bare pipe + 1 KV create/msg (reference, 1 run)",
	"A-kv2":   "A-kv2  bare pipe + KV create + overwrite/msg (reference, 1 run)",
}

// refVariants are the one-run references of the pipe, in run and print order.
var refVariants = []string{"A-hdrs", "A-kv1", "A-kv2"}

func benchMain(cfg config) error {
	start := time.Now()
	variants := strings.Split(cfg.variants, ",")
	var notes []string
	var main []string
	for _, v := range variants {
		v = strings.TrimSpace(v)
		if _, err := variantByName(v); err != nil {
			return fmt.Errorf("-variants: %w (want A, B, C, D, O or P)", err)
		}
		main = append(main, v)
	}
	log := os.Stderr
	rules, _ := filepath.Abs(cfg.rules)
	if _, err := loadCellTable(rules); err != nil {
		return err
	}
	if err := checkRulesAgainstRouter(rules); err != nil {
		return err
	}
	runs := map[string][]*runResult{}
	mkSpec := func(v string, round int) childSpec {
		s := childSpec{Variant: v, N: cfg.n, Seed: cfg.seed, Rules: rules, Tune: cfg.tune[strings.TrimSuffix(strings.TrimSuffix(v, "-fault"), "-lat")]}
		if cfg.cpuprofile != "" && round == 1 {
			s.CPUProfile = cfg.cpuprofile + "-" + v + ".pprof"
			if cfg.memprofile {
				s.MemProfile = cfg.cpuprofile + "-" + v + ".allocs.pprof"
			}
		}
		return s
	}
	fmt.Fprintf(log, "cellbridge-bench: N=%d rounds=%d variants=%s (each run: child process, fresh embedded nats-server, file storage)\n",
		cfg.n, cfg.rounds, strings.Join(main, " "))
	for round := 1; round <= cfg.rounds; round++ {
		for _, v := range main {
			r, err := spawn(mkSpec(v, round), log)
			if err != nil {
				return err
			}
			r.Round = round
			runs[v] = append(runs[v], r)
			fmt.Fprintf(log, "  round %d %-2s %9.0f msg/s  %6.2fs  cpu %5.1f us/msg  rss %5.0f MiB  load %s verified=%v %s\n",
				round, v, r.MsgsPerS, r.Seconds, r.CPUus, r.PeakRSSMB, r.LoadAvg, r.Verified, r.VerifyNote)
		}
	}
	med := func(v string) float64 {
		var xs []float64
		for _, r := range runs[v] {
			xs = append(xs, r.MsgsPerS)
		}
		return median(xs)
	}
	// Reference: the pipe also sending cellbridge's six Cell-* headers, to
	// separate the cost of bigger messages from the pipeline's own. One run.
	if cfg.extra {
		s := mkSpec("A-hdrs", 1)
		s.Variant = "A"
		s.Tune = strings.Trim(s.Tune+",cellhdrs=1", ",")
		r, err := spawn(s, log)
		if err != nil {
			return err
		}
		runs["A-hdrs"] = append(runs["A-hdrs"], r)
		fmt.Fprintf(log, "  ref    A-hdrs %9.0f msg/s  cpu %5.1f us/msg  load %s verified=%v\n", r.MsgsPerS, r.CPUus, r.LoadAvg, r.Verified)
	}
	// References for the KV dedupe store: what any design pays for an atomic
	// per-key record in a JetStream KV bucket shared by replicas, without
	// cellbridge's code. A-kv1: one create per message; A-kv2: create and
	// overwrite, the two writes of C's protocol. One run each.
	if cfg.refKV {
		for _, v := range []string{"A-kv1", "A-kv2"} {
			r, err := spawn(mkSpec(v, 1), log)
			if err != nil {
				return err
			}
			runs[v] = append(runs[v], r)
			if !r.Verified {
				notes = append(notes, fmt.Sprintf("reference %s not verified: %s", v, r.VerifyNote))
			}
			fmt.Fprintf(log, "  ref    %-6s %9.0f msg/s  cpu %5.1f us/msg  load %s verified=%v %s\n", v, r.MsgsPerS, r.CPUus, r.LoadAvg, r.Verified, r.VerifyNote)
		}
	}
	// Fault variants: one run each (budget), N events.
	if cfg.faults {
		fn := cfg.faultN
		if fn == 0 {
			fn = cfg.n
		}
		for _, v := range []string{"B-fault", "D-fault"} {
			s := mkSpec(v, 0)
			s.N, s.Fault = fn, true
			r, err := spawn(s, log)
			if err != nil {
				return err
			}
			runs[v] = append(runs[v], r)
			fmt.Fprintf(log, "  fault  %-7s delivered %d of %d (unique %d) injected=%v  %s\n",
				v, r.Delivered, r.N, r.Unique, r.Extra["injected_faults"], r.VerifyNote)
		}
	}
	// Latency at half of A's median rate (the target) and at 30% of it
	// (headroom left for the paced producer, which shares the machine): the
	// pipe first, as the reference for "added" latency, then cellbridge.
	halfRate := med("A") / 2
	if cfg.latencyRate > 0 {
		halfRate = cfg.latencyRate
	}
	if cfg.latency && halfRate > 0 {
		for _, lv := range []struct {
			suffix string
			rate   float64
			rounds int
		}{{"-lat", halfRate, max(cfg.latRounds, 1)}, {"-lat30", med("A") * 0.3, 1}} {
			if lv.rate <= 0 { // no A runs to take the rate from
				continue
			}
			// Alternating pairs: a stall of the machine hits one run, not
			// one variant, and the median of each variant's p99 discards it.
			for _, v := range latencyOrder(lv.rounds) {
				s := mkSpec(v+lv.suffix, 0)
				s.Variant = v
				s.Rate = lv.rate
				s.N = min(cfg.n, int(lv.rate*4)) // ~4 s of offered load
				r, err := spawn(s, log)
				if err != nil {
					return err
				}
				r.Offered = lv.rate
				runs[v+lv.suffix] = append(runs[v+lv.suffix], r)
				// The bench itself keeps about NumCPU threads runnable; more
				// than twice that means other work competed.
				if l, err := strconv.ParseFloat(r.LoadAvg, 64); err == nil && l > 2*float64(runtime.NumCPU()) {
					notes = append(notes, fmt.Sprintf("latency run %s at %.0f msg/s ended at load %.1f on %d cores: other work was competing for the CPUs, the latency figures of this run measure queueing behind it",
						v, lv.rate, l, runtime.NumCPU()))
				}
				fmt.Fprintf(log, "  latency %s at %.0f msg/s: p50 %.2f p90 %.2f p99 %.2f max %.2f ms verified=%v\n", v, lv.rate,
					r.LatencyMS["p50"], r.LatencyMS["p90"], r.LatencyMS["p99"], r.LatencyMS["max"], r.Verified)
			}
		}
	}
	// RocketMQ: bare client loop vs cellbridge through the in-process broker.
	if cfg.rmqRounds > 0 {
		rrules, _ := filepath.Abs(cfg.rmqRules)
		for round := 1; round <= cfg.rmqRounds; round++ {
			for _, v := range []string{"R-A", "R-B"} {
				s := childSpec{Variant: v, N: cfg.rmqN, Seed: cfg.seed, Rules: rrules, Tune: cfg.tune[v]}
				if cfg.cpuprofile != "" && round == 1 {
					s.CPUProfile = cfg.cpuprofile + "-" + v + ".pprof"
				}
				r, err := spawn(s, log)
				if err != nil {
					return err
				}
				r.Round = round
				runs[v] = append(runs[v], r)
				fmt.Fprintf(log, "  rmq round %d %-3s %9.0f msg/s  %6.2fs  cpu %5.1f us/msg  rss %5.0f MiB  load %s verified=%v %s\n",
					round, v, r.MsgsPerS, r.Seconds, r.CPUus, r.PeakRSSMB, r.LoadAvg, r.Verified, r.VerifyNote)
			}
		}
	} else {
		notes = append(notes, "RocketMQ comparison skipped (-rmq-rounds 0)")
	}

	if err := runBroadcastRounds(cfg, log, rules, runs); err != nil {
		return err
	}

	res := buildResults(cfg, main, runs, med, notes, time.Since(start))
	broadcastResults(res, runs)
	printTable(os.Stdout, cfg, main, runs, med, res, notes)
	if cfg.out != "" {
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(cfg.out, append(b, '\n'), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(os.Stdout, "\nwrote %s (%.0fs total)\n", cfg.out, time.Since(start).Seconds())
	}
	return nil
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return float64(int(a/b*1000+0.5)) / 1000
}

func buildResults(cfg config, main []string, runs map[string][]*runResult, med func(string) float64, notes []string, took time.Duration) map[string]any {
	pipe, br, kv, wm, ord, part := med("A"), med("B"), med("C"), med("D"), med("O"), med("P")
	res := map[string]any{
		"n":                         cfg.n,
		"rounds":                    cfg.rounds,
		"order":                     strings.Join(main, " "),
		"pipe_msgs_per_s":           round0(pipe),
		"bridge_msgs_per_s":         round0(br),
		"bridge_kv_msgs_per_s":      round0(kv),
		"watermill_msgs_per_s":      round0(wm),
		"ratio_bridge_vs_pipe":      ratio(br, pipe),
		"ratio_bridge_kv_vs_pipe":   ratio(kv, pipe),
		"ratio_bridge_vs_watermill": ratio(br, wm),
		// The ordered modes against B, the shared durable of the same
		// bridge (target: at least 0.95).
		"ordered_msgs_per_s":          round0(ord),
		"partitioned_msgs_per_s":      round0(part),
		"ratio_ordered_vs_bridge":     ratio(ord, br),
		"ratio_partitioned_vs_bridge": ratio(part, br),
		"machine": map[string]any{
			"cores":      runtime.NumCPU(),
			"gomaxprocs": runtime.GOMAXPROCS(0),
			"go":         runtime.Version(),
			"os_arch":    runtime.GOOS + "/" + runtime.GOARCH,
		},
		"rss_note":      "peak RSS = VmHWM of the child process during the timed phase; the embedded nats-server runs in the same process as the variant (as the embedded default does)",
		"notes":         notes,
		"total_seconds": round0(took.Seconds()),
	}
	rss := map[string]float64{}
	allocs := map[string]float64{}
	cpu := map[string]float64{}
	per := map[string]any{}
	for v, rs := range runs {
		var r []float64
		var rsv []float64
		var al []float64
		var cp []float64
		for _, x := range rs {
			cp = append(cp, x.CPUus)
			r = append(r, round0(x.MsgsPerS))
			rsv = append(rsv, x.PeakRSSMB)
			if x.N > 0 {
				al = append(al, float64(x.Mallocs)/float64(x.N))
			}
		}
		rss[v] = round1(median(rsv))
		allocs[v] = round1(median(al))
		cpu[v] = round1(median(cp))
		per[v] = rs
	}
	res["peak_rss_mb"] = rss["B"]
	res["peak_rss_mb_by_variant"] = rss
	res["cpu_us_per_msg_by_variant"] = cpu
	res["cpu_note"] = "process CPU time (user+sys, embedded server included) per forwarded message over the timed phase, median of the rounds; unlike msg/s it hardly moves with other load on the machine, so the cpu ratios estimate the throughput ratios on an idle, CPU-bound machine"
	if cpu["B"] > 0 {
		res["cpu_ratio_bridge_vs_pipe"] = ratio(cpu["A"], cpu["B"])
		res["cpu_ratio_bridge_vs_watermill"] = ratio(cpu["D"], cpu["B"])
	}
	if cpu["C"] > 0 {
		res["cpu_ratio_bridge_kv_vs_pipe"] = ratio(cpu["A"], cpu["C"])
	}
	if cpu["B"] > 0 && cpu["O"] > 0 {
		res["cpu_ratio_ordered_vs_bridge"] = ratio(cpu["B"], cpu["O"])
	}
	if cpu["B"] > 0 && cpu["P"] > 0 {
		res["cpu_ratio_partitioned_vs_bridge"] = ratio(cpu["B"], cpu["P"])
	}
	if cpu["A-hdrs"] > 0 && cpu["B"] > 0 {
		res["cpu_ratio_bridge_vs_pipe_with_cell_headers"] = ratio(cpu["A-hdrs"], cpu["B"])
	}
	// The KV references: their ratio to the pipe is the floor any design
	// with that many KV writes per message pays; C against A-kv2 is what
	// cellbridge costs on top of the same protocol.
	for _, k := range []struct{ v, key string }{{"A-kv1", "pipe_kv1"}, {"A-kv2", "pipe_kv2"}} {
		rs := runs[k.v]
		if len(rs) == 0 {
			continue
		}
		res[k.key+"_msgs_per_s"] = round0(rs[0].MsgsPerS)
		res["ratio_"+k.key+"_vs_pipe"] = ratio(rs[0].MsgsPerS, pipe)
		if cpu[k.v] > 0 && cpu["A"] > 0 {
			res["cpu_ratio_"+k.key+"_vs_pipe"] = ratio(cpu["A"], cpu[k.v])
		}
	}
	if rs := runs["A-kv2"]; len(rs) > 0 && kv > 0 {
		res["ratio_bridge_kv_vs_pipe_kv2"] = ratio(kv, rs[0].MsgsPerS)
		if cpu["C"] > 0 {
			res["cpu_ratio_bridge_kv_vs_pipe_kv2"] = ratio(cpu["A-kv2"], cpu["C"])
		}
	}
	var loads []string
	for _, v := range main {
		for _, x := range runs[v] {
			loads = append(loads, x.LoadAvg)
		}
	}
	res["load_avg_1m_per_run"] = strings.Join(loads, " ")
	res["allocs_per_msg"] = allocs["B"]
	res["allocs_per_msg_by_variant"] = allocs
	res["allocs_note"] = "process-wide heap allocations (runtime.MemStats.Mallocs delta over the timed phase) / N; they include the embedded nats-server's own allocations, so the bridge's share is allocs_per_msg - allocs_per_msg_by_variant.A"
	res["latency_note"] = "producer publish call → message stored in the cell stream (cell stream timestamp vs the producer's time header), so it includes the source store and the sink store; the paced producer runs in the same process and shares the 2 cores; pipe_* is the bare pipe at the same load, the latency cellbridge adds is the difference"
	for _, lv := range []struct{ suffix, key string }{{"-lat", "half_load"}, {"-lat30", "30pct_load"}} {
		lr, ok := runs["B"+lv.suffix]
		if !ok || len(lr) == 0 || lr[0].LatencyMS == nil {
			if lv.key == "half_load" {
				res["p99_latency_ms_half_load"] = nil
			}
			continue
		}
		bp99, bp50 := latencyMedian(lr, "p99"), latencyMedian(lr, "p50")
		res["p99_latency_ms_"+lv.key] = round2(bp99)
		res["p50_latency_ms_"+lv.key] = round2(bp50)
		res["latency_runs_"+lv.key] = len(lr)
		res["latency_offered_msgs_per_s_"+lv.key] = round0(lr[0].Offered)
		if pr, ok := runs["A"+lv.suffix]; ok && len(pr) > 0 && pr[0].LatencyMS != nil {
			ap99 := latencyMedian(pr, "p99")
			res["pipe_p99_latency_ms_"+lv.key] = round2(ap99)
			res["pipe_p50_latency_ms_"+lv.key] = round2(latencyMedian(pr, "p50"))
			res["p99_added_latency_ms_"+lv.key] = round2(bp99 - ap99)
		}
	}
	for _, v := range []string{"B-fault", "D-fault"} {
		if rs, ok := runs[v]; ok && len(rs) > 0 {
			key := map[string]string{"B-fault": "bridge_fault", "D-fault": "watermill_fault"}[v]
			res[key+"_delivered"] = rs[0].Delivered
			res[key+"_unique"] = rs[0].Unique
			res[key+"_n"] = rs[0].N
			res[key+"_injected"] = rs[0].Extra["injected_faults"]
		}
	}
	if len(runs["R-A"]) > 0 {
		var ra, rb []float64
		for _, x := range runs["R-A"] {
			ra = append(ra, x.MsgsPerS)
		}
		for _, x := range runs["R-B"] {
			rb = append(rb, x.MsgsPerS)
		}
		res["rmq_n"] = cfg.rmqN
		res["rmq_pipe_msgs_per_s"] = round0(median(ra))
		res["rmq_bridge_msgs_per_s"] = round0(median(rb))
		res["rmq_ratio_bridge_vs_pipe"] = ratio(median(rb), median(ra))
	}
	settings := map[string]string{}
	for v, rs := range runs {
		if len(rs) > 0 && rs[0].Settings != "" {
			settings[v] = rs[0].Settings
		}
	}
	res["settings"] = settings
	res["runs"] = per
	return res
}

func round0(x float64) float64 { return float64(int64(x + 0.5)) }
func round1(x float64) float64 { return float64(int64(x*10+0.5)) / 10 }
func round2(x float64) float64 { return float64(int64(x*100+0.5)) / 100 }

func printTable(w io.Writer, cfg config, main []string, runs map[string][]*runResult, med func(string) float64, res map[string]any, notes []string) {
	fmt.Fprintf(w, "cellbridge-bench  N=%d  rounds=%d (alternating %s)  cores=%d GOMAXPROCS=%d %s\n",
		cfg.n, cfg.rounds, strings.Join(main, " "), runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version())
	fmt.Fprintln(w, "each run: child process with a fresh embedded nats-server (JetStream, file storage) in the same process as the variant;")
	fmt.Fprintln(w, "timing: first copy in a cell stream until the cell streams hold N (events pre-published to ORDERS before timing;")
	fmt.Fprintln(w, "  start-up, the winning of pins and the partitioned replicas' first heartbeat are not timed); O and P run their two")
	fmt.Fprintln(w, "  replicas in the one child process; P publishes the user id in the subject (orders.<user>.created)")
	fmt.Fprintln(w, "references (one run each, after the rounds; \"vs pipe\" against A's median): A-hdrs = A + cellbridge's six Cell-* headers;")
	fmt.Fprintln(w, "  A-kv1 = A + per message one atomic KV create (expected last subject seq 0, TTL 30s) awaited before the cell publish;")
	fmt.Fprintln(w, "  A-kv2 = A-kv1 + a KV overwrite \"c\" after the cell PubAck, awaited before the source ack (C's protocol, minimal loop)")
	fmt.Fprintf(w, "machine load (1-min load average) at the end of each run: %v\n", res["load_avg_1m_per_run"])
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "variant\tmedian msg/s\truns msg/s\tvs pipe\tCPU us/msg\tpeak RSS MiB\tallocs/msg\tverified\t")
	pipe := med("A")
	for _, v := range main {
		var xs []string
		ok := true
		for _, r := range runs[v] {
			xs = append(xs, fmt.Sprintf("%.0f", r.MsgsPerS))
			ok = ok && r.Verified
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%s\t%.3f\t%.1f\t%.0f\t%.1f\t%v\t\n", variantNames[v], med(v), strings.Join(xs, " "),
			ratio(med(v), pipe), res["cpu_us_per_msg_by_variant"].(map[string]float64)[v], res["peak_rss_mb_by_variant"].(map[string]float64)[v],
			res["allocs_per_msg_by_variant"].(map[string]float64)[v], ok)
	}
	for _, v := range []string{"R-A", "R-B"} {
		if rs, ok := runs[v]; ok && len(rs) > 0 {
			var xs []string
			var ms, cp, rss, al []float64
			ok := true
			for _, r := range rs {
				xs = append(xs, fmt.Sprintf("%.0f", r.MsgsPerS))
				ms = append(ms, r.MsgsPerS)
				cp = append(cp, r.CPUus)
				rss = append(rss, r.PeakRSSMB)
				al = append(al, float64(r.Mallocs)/float64(max(r.N, 1)))
				ok = ok && r.Verified
			}
			fmt.Fprintf(tw, "%s\t%.0f\t%s\t%s\t%.1f\t%.0f\t%.1f\t%v\t\n", variantNames[v], median(ms), strings.Join(xs, " "),
				"n/a", median(cp), median(rss), median(al), ok)
		}
	}
	for _, v := range refVariants {
		if rs, ok := runs[v]; ok && len(rs) > 0 {
			r := rs[0]
			fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.3f\t%.1f\t%.0f\t%.1f\t%v\t\n", variantNames[v], r.MsgsPerS, r.MsgsPerS,
				ratio(r.MsgsPerS, pipe), r.CPUus, r.PeakRSSMB, float64(r.Mallocs)/float64(max(r.N, 1)), r.Verified)
		}
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, k := range []string{"ratio_bridge_vs_pipe", "ratio_bridge_kv_vs_pipe", "ratio_bridge_vs_watermill", "ratio_ordered_vs_bridge", "cpu_ratio_ordered_vs_bridge", "ratio_partitioned_vs_bridge", "cpu_ratio_partitioned_vs_bridge", "p99_latency_ms_half_load", "p50_latency_ms_half_load", "pipe_p99_latency_ms_half_load", "p99_added_latency_ms_half_load", "p99_latency_ms_30pct_load", "pipe_p99_latency_ms_30pct_load", "p99_added_latency_ms_30pct_load", "cpu_ratio_bridge_vs_pipe", "cpu_ratio_bridge_vs_pipe_with_cell_headers", "cpu_ratio_bridge_kv_vs_pipe", "cpu_ratio_bridge_vs_watermill", "ratio_pipe_kv1_vs_pipe", "cpu_ratio_pipe_kv1_vs_pipe", "ratio_pipe_kv2_vs_pipe", "cpu_ratio_pipe_kv2_vs_pipe", "ratio_bridge_kv_vs_pipe_kv2", "cpu_ratio_bridge_kv_vs_pipe_kv2", "rmq_n", "rmq_ratio_bridge_vs_pipe", "allocs_per_msg", "peak_rss_mb"} {
		if v, ok := res[k]; ok {
			fmt.Fprintf(w, "%-28s %v\n", k, v)
		}
	}
	for _, v := range []string{"B-fault", "D-fault"} {
		if rs, ok := runs[v]; ok && len(rs) > 0 {
			r := rs[0]
			fmt.Fprintf(w, "%-52s ends with %d of %d (unique %d, injected failures %v)%s\n", variantNames[v], r.Delivered, r.N, r.Unique,
				r.Extra["injected_faults"], map[bool]string{true: "", false: "  ← " + r.VerifyNote}[r.Verified])
		}
	}
	for _, v := range []string{"A-lat", "B-lat", "A-lat30", "B-lat30"} {
		rs := runs[v]
		for _, r := range rs {
			fmt.Fprintf(w, "latency %-2s at %6.0f msg/s offered (%d msgs): p50 %7.2f ms  p90 %7.2f ms  p99 %7.2f ms  max %7.2f ms (verified=%v)\n",
				r.Variant, r.Offered, r.N, r.LatencyMS["p50"], r.LatencyMS["p90"], r.LatencyMS["p99"], r.LatencyMS["max"], r.Verified)
		}
		if len(rs) > 1 {
			fmt.Fprintf(w, "latency %-2s median of %d runs:                     p50 %7.2f ms                    p99 %7.2f ms\n",
				rs[0].Variant, len(rs), latencyMedian(rs, "p50"), latencyMedian(rs, "p99"))
		}
	}
	printBroadcast(w, runs, res)
	fmt.Fprintln(w)
	fmt.Fprintln(w, "settings:")
	for _, v := range append(append(append([]string{}, main...), "B-fault", "D-fault", "R-A", "R-B", "A-bc", "B-bc"), refVariants...) {
		if rs, ok := runs[v]; ok && len(rs) > 0 && rs[0].Settings != "" {
			fmt.Fprintf(w, "  %s: %s\n", v, rs[0].Settings)
		}
	}
	for _, n := range notes {
		fmt.Fprintln(w, "note:", n)
	}
}

// loadAvg is the 1-minute load average: the harness prints it with every run
// because other work on the machine distorts throughput.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}
