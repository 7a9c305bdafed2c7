package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/embedded"
)

// soakMain runs the soak in a child process (fresh heap, its own RSS) and
// passes its output and exit code through.
func soakMain(cfg config) int {
	// Default load: 30% of the pipe's rate. Half of it, the latency target's
	// load, is more than the machine sustains for long once the producer and
	// the source stream share it with the bridge (about 12 µs per message on
	// top of cellbridge's ~20): the backlog, and with it the server's memory,
	// then grows without bound and RSS says nothing about the bridge.
	rate := cfg.soakRate
	if rate <= 0 {
		rate = 30000
		if b, err := os.ReadFile("bench/results.json"); err == nil {
			var r struct {
				Pipe float64 `json:"pipe_msgs_per_s"`
			}
			if json.Unmarshal(b, &r) == nil && r.Pipe > 0 {
				rate = r.Pipe * 0.3
			}
		}
	}
	rules, _ := filepath.Abs(cfg.rules)
	variant := "B"
	if v := os.Getenv("BENCH_SOAK_VARIANT"); v != "" {
		variant = v // e.g. A: the pipe under the same soak, to tell server memory from bridge memory
	}
	spec := childSpec{Variant: variant, Seed: cfg.seed, Rules: rules, Rate: rate, Soak: cfg.soak.String(), N: 100000,
		Tune: cfg.tune["B"]}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	b, _ := json.Marshal(spec)
	cmd := exec.Command(self, "-child", string(b))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// runSoak runs variant B at a fixed offered load for spec.Soak, printing RSS
// and goroutines every minute and at the end. It fails when the goroutine
// count keeps growing or forwarding falls behind the offered load.
func runSoak(spec childSpec) error {
	dur, err := time.ParseDuration(spec.Soak)
	if err != nil {
		return err
	}
	fn, err := variantByName(spec.Variant)
	if err != nil {
		return err
	}
	table, err := loadCellTable(spec.Rules)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "cellbridge-soak-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	srv, err := embedded.Start(embedded.Options{Port: -1, StoreDir: dir})
	if err != nil {
		return err
	}
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	// Bounded streams: the soak is about the bridge's memory, not the disk.
	if err := createStreams(ctx, js, table, 100_000, 0); err != nil {
		return err
	}
	e := &env{url: srv.ClientURL(), srv: srv, table: table, spec: spec, tune: parseTune(spec.Tune)}
	evs := genEvents(spec.N, spec.Seed)
	vctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var verr error
	wg.Add(1)
	go func() { defer wg.Done(); verr = fn(vctx, e) }()

	var sent int64
	var sentMu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		start := time.Now()
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		var i int64
		for {
			select {
			case <-vctx.Done():
				return
			case <-tick.C:
			}
			due := int64(time.Since(start).Seconds() * spec.Rate)
			for ; i < due; i++ {
				ev := evs[i%int64(len(evs))]
				m := &nats.Msg{Subject: "orders.created", Data: ev.body, Header: nats.Header{nats.MsgIdHdr: []string{"s-" + strconv.FormatInt(i, 10)}}}
				if _, err := js.PublishMsgAsync(m, jetstream.WithStallWait(time.Minute)); err != nil {
					fmt.Fprintln(os.Stderr, "soak producer:", err)
					return
				}
			}
			sentMu.Lock()
			sent = i
			sentMu.Unlock()
		}
	}()

	fmt.Printf("soak: variant %s at %.0f msg/s offered for %s; embedded nats-server in the same process\n", spec.Variant, spec.Rate, dur)
	fmt.Printf("%8s %10s %10s %10s %12s %12s %10s %6s\n", "elapsed", "rss MiB", "heap MiB", "goroutines", "published", "forwarded", "backlog", "load")
	// Goroutines are sampled every 5s; the verdict compares the lowest count
	// of the last quarter with the highest of the first half (after the
	// first minute's warm-up), so transient bursts do not count as growth.
	type sample struct {
		at time.Duration
		g  int
	}
	var samples []sample
	t0 := time.Now()
	every := time.NewTicker(5 * time.Second)
	defer every.Stop()
	lastReport := t0
	end := time.After(dur)
	report := func() {
		sentMu.Lock()
		p := sent
		sentMu.Unlock()
		fwd := forwardedTotal(srv)
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Printf("%8s %10.1f %10.1f %10d %12d %12d %10d %6s\n", time.Since(t0).Round(time.Second), readRSSMB(),
			float64(ms.HeapAlloc)/(1<<20), runtime.NumGoroutine(), p, fwd, p-fwd, loadAvg())
	}
	done := false
	for !done {
		select {
		case <-every.C:
			samples = append(samples, sample{time.Since(t0), runtime.NumGoroutine()})
			if dump := os.Getenv("BENCH_GDUMP"); dump != "" && runtime.NumGoroutine() > 300 {
				if f, err := os.Create(dump); err == nil {
					_ = pprof.Lookup("goroutine").WriteTo(f, 1)
					f.Close()
				}
			}
			if time.Since(lastReport) >= time.Minute-time.Second {
				lastReport = time.Now()
				report()
			}
		case <-end:
			done = true
		case <-ctx.Done():
			done = true
		}
	}
	if time.Since(lastReport) > 5*time.Second {
		report()
	}
	if p := os.Getenv("BENCH_HEAP"); p != "" {
		if f, err := os.Create(p); err == nil {
			runtime.GC()
			_ = pprof.Lookup("heap").WriteTo(f, 0)
			f.Close()
		}
	}
	sentMu.Lock()
	backlog := sent - forwardedTotal(srv)
	sentMu.Unlock()
	if float64(backlog) > spec.Rate*10 {
		fmt.Printf("soak: warning: forwarding fell behind the offered load (backlog %d, more than 10 s of load); RSS then includes the server's backlog\n", backlog)
	}
	cancel()
	wg.Wait()
	if verr != nil && vctx.Err() == nil {
		return verr
	}
	var first, last []int
	for _, s := range samples {
		switch {
		case s.at < time.Minute && dur > 2*time.Minute:
		case s.at <= dur/2:
			first = append(first, s.g)
		case s.at >= dur*3/4:
			last = append(last, s.g)
		}
	}
	if len(first) > 0 && len(last) > 0 {
		hi, lo := slices.Max(first), slices.Min(last)
		if lo > hi+max(50, hi/2) {
			return fmt.Errorf("goroutines grew: at most %d in the first half, at least %d in the last quarter", hi, lo)
		}
		fmt.Printf("soak: goroutines flat (first half max %d, last quarter min %d)\n", hi, lo)
	}
	return nil
}

// forwardedTotal is the number of messages the cell streams have received
// (their last sequence numbers: the streams are bounded and drop old ones).
func forwardedTotal(srv *server.Server) int64 {
	d, err := srv.JszAccount(&server.JSzOptions{Account: server.DEFAULT_GLOBAL_ACCOUNT, Streams: true})
	if err != nil {
		return 0
	}
	var n int64
	for _, s := range d.Streams {
		if strings.HasPrefix(s.Name, "CELL_") {
			n += int64(s.State.LastSeq)
		}
	}
	return n
}
