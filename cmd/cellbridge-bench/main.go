// Command cellbridge-bench measures cellbridge as it is deployed: a
// nats-server process of its own (fresh for every run), the bridge as the
// real `cellbridge run` binary with a configuration file, and the load
// generator and verifier in this process; side by side with a bare nats.go
// consume → publish → ack pipe, watermill and the other hand-written
// references, each in a process of its own. It writes bench/results.json.
// See `make bench`, `make bench-short` and `make soak`, and bench/notes.md.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

type config struct {
	n             int
	slowN         int
	rounds        int
	out           string
	variants      string
	short         bool
	soak          time.Duration
	soakRate      float64
	seed          uint64
	rules         string
	rmqRules      string
	tune          map[string]string
	latency       bool
	latRates      string
	latVariants   string
	latRounds     int
	latSeconds    float64
	rmqN          int
	rmqRounds     int
	bcN           int
	bcRounds      int
	refHeaders    bool
	profile       string
	profileSec    float64
	profileRounds int
	traceSec      float64
	consumerTrace string
	timeline      string
	tlEvery       int
}

func main() {
	var (
		cfg       config
		childSpec string
		childOut  string
		procSpec  string
		tunes     multiFlag
	)
	flag.IntVar(&cfg.n, "n", 200000, "events per throughput run of A, B, O, P (the KV and watermill variants take -slow-n)")
	flag.IntVar(&cfg.slowN, "slow-n", 0, "events per run of the slower variants C, A-kv1, A-kv2 and D (default n/2)")
	flag.IntVar(&cfg.rounds, "rounds", 3, "alternating rounds of the throughput variants (medians are reported)")
	flag.StringVar(&cfg.out, "out", "", "write results JSON here (e.g. bench/results.json)")
	flag.StringVar(&cfg.variants, "variants", "A,B,O,O~cum,P,P2,P2~cum,C,A-kv1,D", "throughput variants in run order: A pipe, B cellbridge (ordering: none, memory store), O cellbridge ordered (default; one active and one standby replica), O~cum and P2~cum: O and P2 with the rule's source.acks: cumulative, P cellbridge partitioned (12 partitions over two replicas), P2 (2 partitions over two replicas), C cellbridge with the JetStream KV store, A-kv1 the pipe with one KV create per message, A-kv2 with create and overwrite, D watermill")
	flag.BoolVar(&cfg.short, "short", false, "a quick run for development (under a minute): one round, 30,000 events, latency at 30% only, small broadcast and RocketMQ runs")
	flag.DurationVar(&cfg.soak, "soak", 0, "soak mode: run B at a fixed load for this long, report RSS and goroutines every minute (in-process: embedded server)")
	flag.Float64Var(&cfg.soakRate, "soak-rate", 0, "soak offered load in msg/s (default: 30% of pipe_msgs_per_s from bench/results.json, else 30000)")
	flag.Uint64Var(&cfg.seed, "seed", 1, "event generation seed")
	flag.StringVar(&cfg.rules, "rules", "bench/rules", "rule directory (same for all variants)")
	flag.StringVar(&cfg.rmqRules, "rmq-rules", "bench/rules-rmq", "rule directory of the RocketMQ comparison")
	flag.Var(&tunes, "tune", "variant tuning, VARIANT:k=v,k=v (repeatable), e.g. A:window=8000 or B:inflight=8192,fetch=2048")
	flag.BoolVar(&cfg.latency, "latency", true, "measure the latency the bridge adds at fixed offered loads")
	flag.StringVar(&cfg.latRates, "latency-rates", "2000,0.3,0.5", "offered loads of the latency runs: msg/s, or a fraction (≤ 1) of the pipe's median throughput")
	flag.StringVar(&cfg.latVariants, "latency-variants", "A,B,O", "variants of the latency runs (A first: the reference for added latency)")
	flag.IntVar(&cfg.latRounds, "latency-rounds", 3, "alternating rounds of the latency runs (medians of p50 and p99 are reported)")
	flag.Float64Var(&cfg.latSeconds, "latency-seconds", 3, "seconds of offered load per latency run")
	flag.IntVar(&cfg.rmqN, "rmq-n", 20000, "events per RocketMQ run (the in-process broker and the client's synchronous sends are slower than JetStream)")
	flag.IntVar(&cfg.rmqRounds, "rmq-rounds", 3, "alternating rounds of the RocketMQ comparison R-A R-B R-C (0: skip)")
	flag.IntVar(&cfg.bcN, "bc-n", 50000, "events per broadcast run (each to 4 cells)")
	flag.IntVar(&cfg.bcRounds, "bc-rounds", 3, "alternating rounds of the broadcast comparison A-bc B-bc (0: skip)")
	flag.BoolVar(&cfg.refHeaders, "ref-headers", true, "one run of the pipe that also sends cellbridge's six Cell-* headers (A-hdrs): what the headers cost the server")
	flag.StringVar(&cfg.profile, "profile", "", "file prefix: CPU profiles of the server and of each variant process in the first round(s) of each throughput variant, PREFIX-<variant>-r<round>-<process>.pprof (a profile longer than the run covers all of it: samples / N = CPU per message)")
	flag.IntVar(&cfg.profileRounds, "profile-rounds", 1, "with -profile: profile the first this many rounds (PREFIX-<variant>-r<round>-<process>.pprof)")
	flag.StringVar(&cfg.consumerTrace, "consumer-trace", "", "file prefix: ORDERS' consumer state (delivered, ack floor, acks pending, waiting pulls, undelivered) at every 10ms poll of each run, PREFIX-<variant>-r<round>.tsv")
	flag.Float64Var(&cfg.traceSec, "trace-seconds", 0, "with -profile: also an execution trace of each variant process over this many seconds from the start of timing (go tool trace; -pprof=sched|sync|net)")
	flag.Float64Var(&cfg.profileSec, "profile-seconds", 2, "length of each -profile profile (from the start of timing), and of -timeline recordings of throughput runs")
	flag.StringVar(&cfg.timeline, "timeline", "", "file prefix: each bridge replica's /debug/timeline (sampled per-message stage times) of the latency runs and the first throughput round, PREFIX-<variant>[-<rate>]-<replica>.json; printed as a summary")
	flag.IntVar(&cfg.tlEvery, "timeline-every", 20, "sample one in this many messages for -timeline")
	flag.StringVar(&procSpec, "variant-proc", "", "internal: run one hand-written loop as its own process (JSON spec)")
	flag.StringVar(&childSpec, "child", "", "internal: soak child (JSON spec)")
	flag.StringVar(&childOut, "child-out", "", "internal: result file of -variant-proc")
	flag.Parse()
	cfg.tune = tunes.m
	if cfg.tune == nil {
		cfg.tune = map[string]string{}
	}
	for v, t := range builtinTunes {
		if _, ok := cfg.tune[v]; !ok {
			cfg.tune[v] = t
		}
	}

	switch {
	case procSpec != "":
		os.Exit(variantProcMain(procSpec, childOut))
	case childSpec != "":
		os.Exit(soakChildMain(childSpec))
	case cfg.soak > 0:
		os.Exit(soakMain(cfg))
	}
	if cfg.short {
		shorten(&cfg)
	}
	if cfg.slowN <= 0 {
		cfg.slowN = cfg.n / 2
	}
	if err := benchMain(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "cellbridge-bench:", err)
		os.Exit(1)
	}
}

// shorten sets the -short run's sizes, keeping flags given explicitly.
func shorten(cfg *config) {
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, v := range map[string]string{"n": "30000", "rounds": "1", "latency-rates": "0.3", "latency-variants": "A,B",
		"latency-rounds": "1", "latency-seconds": "2", "rmq-n": "4000", "rmq-rounds": "1", "bc-n": "8000", "bc-rounds": "1", "ref-headers": "false"} {
		if !set[name] {
			_ = flag.Set(name, v)
		}
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

// soakChildMain is the soak's child process.
func soakChildMain(specJSON string) int {
	var spec childSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	if err := runSoak(spec); err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		return 1
	}
	return 0
}

// runResult is one run as the harness reports it.
type runResult struct {
	childResult
	Round   int     `json:"round"`
	LoadAvg string  `json:"load_avg_1m"`                  // machine load when the run ended (other work distorts msg/s)
	Offered float64 `json:"offered_msgs_per_s,omitempty"` // latency runs
	// WallSeconds is the whole run: server start, variant start, timed
	// phase, stop, verification.
	WallSeconds float64 `json:"wall_seconds"`
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
	"A":      "A  bare pipe (nats.go jetstream)",
	"B":      "B  cellbridge, ordering: none, memory store",
	"O":      "O  cellbridge ordered (default): 1 active + 1 standby",
	"P":      "P  cellbridge partitioned: 12 over 2 replicas",
	"P2":     "P2  cellbridge partitioned: 2 over 2 replicas",
	"C":      "C  cellbridge, JetStream KV store, protocol: check",
	"D":      "D  watermill + watermill-nats",
	"R-A":    "R-A  RocketMQ bare client loop",
	"R-B":    "R-B  RocketMQ cellbridge, memory store",
	"R-C":    "R-C  RocketMQ cellbridge, transactional, KV store",
	"A-hdrs": "A-hdrs  pipe + the six Cell-* headers",
	"A-kv1":  "A-kv1  pipe + 1 KV create/msg",
	"A-kv2":  "A-kv2  pipe + KV create + overwrite/msg",
}

// builtinTunes are the tuned variants the default run measures (-tune
// VARIANT~NAME:... given on the command line replaces one).
var builtinTunes = map[string]string{
	"O~cum":  "acks=cumulative",
	"P2~cum": "acks=cumulative",
}

// nOf is the number of events of a throughput run of v.
func (cfg config) nOf(v string) int {
	switch v {
	case "C", "A-kv1", "A-kv2", "D":
		return cfg.slowN
	}
	return cfg.n
}

func benchMain(cfg config) error {
	start := time.Now()
	var main []string
	for _, v := range strings.Split(cfg.variants, ",") {
		v = strings.TrimSpace(v)
		if base, _, _ := strings.Cut(v, "~"); variantNames[base] == "" || strings.HasPrefix(v, "R-") {
			return fmt.Errorf("-variants: unknown variant %q (want A, B, O, P, C, A-kv1, A-kv2, D, A-hdrs, or VARIANT~NAME for one tuned by -tune VARIANT~NAME:...)", v)
		}
		main = append(main, v)
	}
	log := os.Stderr
	h, err := newHarness(cfg, log)
	if err != nil {
		return err
	}
	defer h.close()
	fmt.Fprintf(log, "cellbridge-bench: topology separate-processes (fresh nats-server process per run; bridge = %s; loops = this binary -variant-proc)\n", h.bridgeBin)
	fmt.Fprintf(log, "  N=%d (C, A-kv1, A-kv2, D: %d) rounds=%d variants=%s\n", cfg.n, cfg.slowN, cfg.rounds, strings.Join(main, " "))
	runs := map[string][]*runResult{}
	record := func(key string, r *runResult) { runs[key] = append(runs[key], r) }
	printRun := func(what string, r *runResult) {
		fmt.Fprintf(log, "  %4.0fs %-16s %9.0f msg/s %6.2fs  cpu variant %5.1f server %5.1f us/msg  syscalls r/w per msg variant %.2f/%.2f server %.2f/%.2f  rss %4.0f MiB  load %s verified=%v %s\n",
			time.Since(start).Seconds(), what, r.MsgsPerS, r.Seconds, r.CPUus, num(r.Extra["server_cpu_us_per_msg"]),
			num(r.Extra["process_reads_per_msg"]), num(r.Extra["process_writes_per_msg"]), num(r.Extra["server_reads_per_msg"]), num(r.Extra["server_writes_per_msg"]),
			r.PeakRSSMB, r.LoadAvg, r.Verified, r.VerifyNote)
	}
	for round := 1; round <= cfg.rounds; round++ {
		for _, v := range main {
			spec := newSpec(v, cfg.tune)
			spec.N, spec.Round, spec.ProfileSeconds, spec.TimelineEvery = cfg.nOf(spec.Variant), round, cfg.profileSec, cfg.tlEvery
			spec.ConsumerTrace = cfg.consumerTrace
			if round <= cfg.profileRounds {
				spec.Profile, spec.TraceSeconds = cfg.profile, cfg.traceSec
			}
			if round == 1 && cfg.timeline != "" && isBridge(spec.Variant) {
				spec.Timeline = cfg.timeline
			}
			r, err := h.runNATS(spec)
			if err != nil {
				return fmt.Errorf("%s round %d: %w", v, round, err)
			}
			record(v, r)
			printRun(fmt.Sprintf("round %d %s", round, v), r)
		}
	}
	if cfg.refHeaders {
		r, err := h.runNATS(runSpec{Variant: "A-hdrs", N: cfg.n, Round: 1, Tune: cfg.tune["A"], Profile: cfg.profile, ProfileSeconds: cfg.profileSec})
		if err != nil {
			return fmt.Errorf("A-hdrs: %w", err)
		}
		record("A-hdrs", r)
		printRun("ref A-hdrs", r)
	}
	for round := 1; round <= cfg.bcRounds; round++ {
		for _, v := range []string{"A" + bcSuffix, "B" + bcSuffix} {
			r, err := h.runNATS(runSpec{Variant: v, N: cfg.bcN, Round: round, Tune: cfg.tune[v]})
			if err != nil {
				return fmt.Errorf("%s round %d: %w", v, round, err)
			}
			record(v, r)
			printRun(fmt.Sprintf("bc round %d %s", round, v), r)
		}
	}
	for round := 1; round <= cfg.rmqRounds; round++ {
		for _, v := range []string{"R-A", "R-B", "R-C"} {
			n := cfg.rmqN
			if v == "R-C" {
				n = rmqKVN(cfg) // a quarter of R-B's rate: half the events
			}
			r, err := h.runRMQ(runSpec{Variant: v, N: n, Round: round, Tune: cfg.tune[v]})
			if err != nil {
				return fmt.Errorf("%s round %d: %w", v, round, err)
			}
			record(v, r)
			printRun(fmt.Sprintf("rmq round %d %s", round, v), r)
		}
	}
	rates, err := latencyRates(cfg.latRates, medianRate(runs["A"]))
	if err != nil {
		return err
	}
	if cfg.latency {
		lvs := strings.Split(cfg.latVariants, ",")
		for round := 1; round <= cfg.latRounds; round++ {
			for _, lr := range rates {
				for _, v := range lvs {
					spec := newSpec(v, cfg.tune)
					spec.N, spec.Rate, spec.Round, spec.TimelineEvery = max(int(lr.rate*cfg.latSeconds), 100), lr.rate, round, cfg.tlEvery
					spec.ConsumerTrace = cfg.consumerTrace
					if round == 1 && cfg.timeline != "" && isBridge(spec.Variant) {
						spec.Timeline = cfg.timeline
					}
					r, err := h.runNATS(spec)
					if err != nil {
						return fmt.Errorf("latency %s at %.0f msg/s: %w", v, lr.rate, err)
					}
					record(latKey(v, lr.name), r)
					fmt.Fprintf(log, "  %4.0fs latency %s %-2s round %d at %6.0f msg/s: p50 %6.2f p90 %6.2f p99 %7.2f max %7.2f ms  cpu bridge %5.1f server %5.1f  load %s verified=%v %s\n",
						time.Since(start).Seconds(), lr.name, v, round, lr.rate, r.LatencyMS["p50"], r.LatencyMS["p90"], r.LatencyMS["p99"], r.LatencyMS["max"],
						r.CPUus, num(r.Extra["server_cpu_us_per_msg"]), r.LoadAvg, r.Verified, r.VerifyNote)
				}
			}
		}
	}
	res := buildResults(cfg, main, rates, runs, time.Since(start))
	printTable(os.Stdout, cfg, main, rates, runs, res)
	if cfg.timeline != "" {
		printTimelines(os.Stdout, cfg.timeline)
	}
	if cfg.out != "" {
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(cfg.out, append(b, '\n'), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(os.Stdout, "\nwrote %s (%.0fs total)\n", cfg.out, time.Since(start).Seconds())
	} else {
		fmt.Fprintf(os.Stdout, "\n%.0fs total\n", time.Since(start).Seconds())
	}
	return nil
}

// latRate is one offered load of the latency runs: its name in the
// results ("2000", "30pct") and msg/s.
type latRate struct {
	name string
	rate float64
}

// latencyRates reads -latency-rates: msg/s, or fractions of pipe.
func latencyRates(s string, pipe float64) ([]latRate, error) {
	var out []latRate
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		x, err := strconv.ParseFloat(f, 64)
		if err != nil || x <= 0 {
			return nil, fmt.Errorf("-latency-rates: %q is not a positive number", f)
		}
		if x > 1 {
			out = append(out, latRate{strconv.FormatFloat(x, 'f', -1, 64), x})
			continue
		}
		if pipe <= 0 {
			continue // no pipe runs to take the rate from
		}
		name := fmt.Sprintf("%.0fpct", x*100)
		if x == 0.5 {
			name = "half_load"
		}
		out = append(out, latRate{name, x * pipe})
	}
	return out, nil
}

func latKey(v, rate string) string { return v + "@" + rate }

func medianRate(rs []*runResult) float64 {
	var xs []float64
	for _, r := range rs {
		xs = append(xs, r.MsgsPerS)
	}
	return median(xs)
}

// medianOf is the median of a per-run figure.
func medianOf(rs []*runResult, f func(*runResult) float64) float64 {
	var xs []float64
	for _, r := range rs {
		xs = append(xs, f(r))
	}
	return median(xs)
}

func num(v any) float64 {
	switch x := v.(type) {
	case float64:
		return x
	case int:
		return float64(x)
	}
	return 0
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return math.Round(a/b*1000) / 1000
}

// Rounding half away from zero (int64(x+0.5) truncated negatives toward
// zero: −0.016 became −0.01).
func round0(x float64) float64 { return math.Round(x) }
func round1(x float64) float64 { return math.Round(x*10) / 10 }
func round2(x float64) float64 { return math.Round(x*100) / 100 }

// variantFigures is the per-variant part of results.json.
func variantFigures(rs []*runResult) map[string]any {
	var rates []float64
	verified := true
	var loads []string
	for _, r := range rs {
		rates = append(rates, round0(r.MsgsPerS))
		verified = verified && r.Verified
		loads = append(loads, r.LoadAvg)
	}
	bridgeCPU := medianOf(rs, func(r *runResult) float64 { return r.CPUus })
	serverCPU := medianOf(rs, func(r *runResult) float64 { return num(r.Extra["server_cpu_us_per_msg"]) })
	m := map[string]any{
		"msgs_per_s":                 round0(median(rates)),
		"rounds_msgs_per_s":          rates,
		"process_cpu_us_per_msg":     round1(bridgeCPU),
		"server_cpu_us_per_msg":      round1(serverCPU),
		"peak_rss_mb":                round0(medianOf(rs, func(r *runResult) float64 { return r.PeakRSSMB })),
		"server_peak_rss_mb":         round0(medianOf(rs, func(r *runResult) float64 { return num(r.Extra["server_peak_rss_mb"]) })),
		"verified":                   verified,
		"load_avg_1m_per_round":      strings.Join(loads, " "),
		"round_spread":               0.0,
		"process_plus_server_cpu_us": round1(bridgeCPU + serverCPU),
	}
	if len(rates) > 0 && slices.Max(rates) > 0 {
		m["round_spread"] = ratio(slices.Min(rates), slices.Max(rates))
	}
	if cp := medianOf(rs, func(r *runResult) float64 { return num(r.Extra["copies_per_s"]) }); cp > 0 {
		m["copies_per_s"] = round0(cp)
	}
	return m
}

func buildResults(cfg config, main []string, rates []latRate, runs map[string][]*runResult, took time.Duration) map[string]any {
	med := func(v string) float64 { return medianRate(runs[v]) }
	pipe, br, ord, wm := med("A"), med("B"), med("O"), med("D")
	res := map[string]any{
		"topology":                  "separate-processes",
		"n":                         cfg.n,
		"n_slow_variants":           cfg.slowN,
		"rounds":                    cfg.rounds,
		"order":                     strings.Join(main, " "),
		"pipe_msgs_per_s":           round0(pipe),
		"bridge_msgs_per_s":         round0(br),
		"ordered_msgs_per_s":        round0(ord),
		"ratio_bridge_vs_pipe":      ratio(br, pipe),
		"ratio_ordered_vs_pipe":     ratio(ord, pipe),
		"ratio_bridge_vs_watermill": ratio(br, wm),
		"machine": map[string]any{
			"cores":   runtime.NumCPU(),
			"go":      runtime.Version(),
			"os_arch": runtime.GOOS + "/" + runtime.GOARCH,
		},
		"total_seconds": round0(took.Seconds()),
		"method": "every run: a fresh nats-server process (JetStream, file storage; the events of a throughput run stored beforehand, " +
			"from a copy of one store per event set), the variant as its own process(es) (cellbridge run with a config file; the loops as " +
			"cellbridge-bench -variant-proc), load generator and verifier in the bench process; throughput timed from the first copy stored " +
			"in a cell stream until the cell streams hold N (polled on the server's /jsz every 10ms); CPU = utime+stime of each process over " +
			"that window from /proc, per forwarded message; every run read back and verified (each event once, in its cell)",
	}
	if wm > 0 {
		res["ratio_ordered_vs_watermill"] = ratio(ord, wm)
	}
	if rs := runs["B"]; len(rs) > 0 {
		res["bridge_round_spread"] = variantFigures(rs)["round_spread"]
	}
	if kv, kv1 := med("C"), med("A-kv1"); kv > 0 && kv1 > 0 {
		res["ratio_kv_vs_kv1"] = ratio(kv, kv1)
	}
	if p := med("P"); p > 0 {
		res["ratio_partitioned_vs_pipe"] = ratio(p, pipe)
		res["ratio_partitioned_vs_bridge"] = ratio(p, br)
	}
	if p := med("P2"); p > 0 {
		res["ratio_partitioned2_vs_pipe"] = ratio(p, pipe)
		res["ratio_partitioned2_vs_bridge"] = ratio(p, br)
	}
	if ord > 0 {
		res["ratio_ordered_vs_bridge"] = ratio(ord, br)
	}
	if oc := med("O~cum"); oc > 0 {
		res["ordered_cumulative_msgs_per_s"] = round0(oc)
		res["ratio_ordered_cumulative_vs_pipe"] = ratio(oc, pipe)
		res["ratio_ordered_cumulative_vs_bridge"] = ratio(oc, br)
	}
	if pc := med("P2~cum"); pc > 0 {
		res["ratio_partitioned2_cumulative_vs_pipe"] = ratio(pc, pipe)
		res["ratio_partitioned2_cumulative_vs_bridge"] = ratio(pc, br)
	}
	if a, b := med("R-A"), med("R-B"); a > 0 {
		res["ratio_rmq_vs_client"] = ratio(b, a)
		res["rmq_n"] = cfg.rmqN
		if c := med("R-C"); c > 0 {
			res["rmq_transactional_kv_n"] = rmqKVN(cfg)
			res["ratio_rmq_transactional_kv_vs_client"] = ratio(c, a)
			res["ratio_rmq_transactional_kv_vs_bridge"] = ratio(c, b)
		}
	}
	if a, b := med("A"+bcSuffix), med("B"+bcSuffix); a > 0 {
		res["broadcast_ratio_bridge_vs_pipe"] = ratio(b, a)
		res["broadcast_cells"] = 4
		res["broadcast_n"] = cfg.bcN
	}
	variants := map[string]any{}
	for v, rs := range runs {
		if !strings.Contains(v, "@") {
			variants[v] = variantFigures(rs)
		}
	}
	res["variants"] = variants
	// The pipe's CPU per message is the reference for what cellbridge
	// costs each process.
	if a, b := variants["A"], variants["B"]; a != nil && b != nil {
		am, bm := a.(map[string]any), b.(map[string]any)
		res["server_cpu_ratio_bridge_vs_pipe"] = ratio(bm["server_cpu_us_per_msg"].(float64), am["server_cpu_us_per_msg"].(float64))
		res["process_cpu_ratio_bridge_vs_pipe"] = ratio(bm["process_cpu_us_per_msg"].(float64), am["process_cpu_us_per_msg"].(float64))
	}
	latency := map[string]any{}
	for _, lr := range rates {
		byV := map[string]any{}
		for _, v := range strings.Split(cfg.latVariants, ",") {
			rs := runs[latKey(v, lr.name)]
			if len(rs) == 0 {
				continue
			}
			var p50s, p99s []float64
			for _, r := range rs {
				p50s = append(p50s, round2(r.LatencyMS["p50"]))
				p99s = append(p99s, round2(r.LatencyMS["p99"]))
			}
			byV[v] = map[string]any{"offered_msgs_per_s": round0(lr.rate), "p50_ms": round2(median(p50s)), "p99_ms": round2(median(p99s)),
				"rounds_p50_ms": p50s, "rounds_p99_ms": p99s, "process_cpu_us_per_msg": round1(medianOf(rs, func(r *runResult) float64 { return r.CPUus })),
				"server_cpu_us_per_msg": round1(medianOf(rs, func(r *runResult) float64 { return num(r.Extra["server_cpu_us_per_msg"]) }))}
		}
		latency[lr.name] = byV
		a, ok := byV["A"].(map[string]any)
		if !ok {
			continue
		}
		for _, v := range []string{"B", "O"} {
			b, ok := byV[v].(map[string]any)
			if !ok {
				continue
			}
			prefix := ""
			if v == "O" {
				prefix = "ordered_"
			}
			res[prefix+"p50_added_latency_ms_"+lr.name] = round2(b["p50_ms"].(float64) - a["p50_ms"].(float64))
			res[prefix+"p99_added_latency_ms_"+lr.name] = round2(b["p99_ms"].(float64) - a["p99_ms"].(float64))
		}
	}
	res["latency"] = latency
	res["latency_note"] = "producer publish call (bench process) → message stored in the cell stream (its store timestamp), so it includes the source store and the target store; added = cellbridge's median minus the pipe's median at the same offered load"
	all := map[string]any{}
	for k, v := range runs {
		all[k] = v
	}
	res["runs"] = all
	return res
}

func printTable(w io.Writer, cfg config, main []string, rates []latRate, runs map[string][]*runResult, res map[string]any) {
	fmt.Fprintf(w, "\ncellbridge-bench  topology: separate processes  N=%d (slow variants %d)  rounds=%d  cores=%d %s\n",
		cfg.n, cfg.slowN, cfg.rounds, runtime.NumCPU(), runtime.Version())
	fmt.Fprintln(w, "CPU µs/msg: the variant's process(es) | the nats-server process, over the timed window, per forwarded message (copy for -bc)")
	fmt.Fprintln(w)
	fmt.Fprintf(w, "%-56s %9s  %-26s %7s %7s %7s %6s %6s %s\n", "variant", "msg/s", "rounds", "vs A", "cpu", "server", "spread", "RSS", "verified / load per round")
	pipe := medianRate(runs["A"])
	order := append(append([]string{}, main...), "A-hdrs", "A-bc", "B-bc", "R-A", "R-B", "R-C")
	for _, v := range order {
		rs := runs[v]
		if len(rs) == 0 {
			continue
		}
		f := variantFigures(rs)
		var xs []string
		for _, x := range f["rounds_msgs_per_s"].([]float64) {
			xs = append(xs, fmt.Sprintf("%.0f", x))
		}
		ref := pipe
		switch v {
		case "A-bc", "B-bc":
			ref = medianRate(runs["A-bc"])
		case "R-A", "R-B", "R-C":
			ref = medianRate(runs["R-A"])
		}
		name := variantNames[v]
		if base, tuned, ok := strings.Cut(v, "~"); ok {
			name = variantNames[base] + " (" + tuned + ": " + cfg.tune[v] + ")"
		}
		if name == "" {
			name = v
		}
		fmt.Fprintf(w, "%-56s %9.0f  %-26s %7.3f %7.1f %7.1f %6.3f %6.0f %v / %s\n", name, f["msgs_per_s"], strings.Join(xs, " "),
			ratio(f["msgs_per_s"].(float64), ref), f["process_cpu_us_per_msg"], f["server_cpu_us_per_msg"], f["round_spread"],
			f["peak_rss_mb"], f["verified"], f["load_avg_1m_per_round"])
	}
	fmt.Fprintln(w)
	for _, lr := range rates {
		for _, v := range strings.Split(cfg.latVariants, ",") {
			rs := runs[latKey(v, lr.name)]
			if len(rs) == 0 {
				continue
			}
			var p50, p99, loads []string
			ok := true
			for _, r := range rs {
				p50 = append(p50, fmt.Sprintf("%.2f", r.LatencyMS["p50"]))
				p99 = append(p99, fmt.Sprintf("%.1f", r.LatencyMS["p99"]))
				loads = append(loads, r.LoadAvg)
				ok = ok && r.Verified
			}
			fmt.Fprintf(w, "latency %-9s %-2s at %6.0f msg/s: p50 %6.2f ms (%s)  p99 %7.2f ms (%s)  cpu %5.1f server %5.1f  verified=%v load %s\n",
				lr.name, v, lr.rate, latencyMedian(rs, "p50"), strings.Join(p50, " "), latencyMedian(rs, "p99"), strings.Join(p99, " "),
				medianOf(rs, func(r *runResult) float64 { return r.CPUus }), medianOf(rs, func(r *runResult) float64 { return num(r.Extra["server_cpu_us_per_msg"]) }),
				ok, strings.Join(loads, " "))
		}
	}
	fmt.Fprintln(w)
	keys := []string{"ratio_bridge_vs_pipe", "ratio_ordered_vs_pipe", "ratio_ordered_vs_bridge", "ratio_partitioned_vs_pipe",
		"ratio_partitioned_vs_bridge", "ratio_partitioned2_vs_bridge", "ratio_bridge_vs_watermill", "ratio_ordered_vs_watermill",
		"bridge_round_spread", "ratio_kv_vs_kv1", "ratio_rmq_vs_client", "ratio_rmq_transactional_kv_vs_client",
		"ratio_rmq_transactional_kv_vs_bridge", "broadcast_ratio_bridge_vs_pipe",
		"server_cpu_ratio_bridge_vs_pipe", "process_cpu_ratio_bridge_vs_pipe"}
	for _, lr := range rates {
		for _, p := range []string{"", "ordered_"} {
			keys = append(keys, p+"p50_added_latency_ms_"+lr.name, p+"p99_added_latency_ms_"+lr.name)
		}
	}
	for _, k := range keys {
		if v, ok := res[k]; ok {
			fmt.Fprintf(w, "%-36s %v\n", k, v)
		}
	}
	fmt.Fprintln(w, "\nsettings:")
	var names []string
	for v, rs := range runs {
		if len(rs) > 0 && rs[0].Settings != "" && !strings.Contains(v, "@") {
			names = append(names, v)
		}
	}
	sort.Strings(names)
	for _, v := range names {
		fmt.Fprintf(w, "  %s: %s\n", v, runs[v][0].Settings)
	}
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

// rmqKVN is the number of events of an R-C run: half of the RocketMQ runs'.
func rmqKVN(cfg config) int { return max(cfg.rmqN/2, 1) }
