package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/cellbridge/cellbridge/bridge"
)

// printTimelines summarises the /debug/timeline recordings written with
// prefix: per recording the time each stage took (p50, p99, max), and the
// windows of 100ms in which messages waited longest end to end (stored →
// acked), with the stage that held them up most in that window. That is
// how the bursts of falling behind show which stage they come from.
func printTimelines(w io.Writer, prefix string) {
	files, _ := filepath.Glob(prefix + "-*.json")
	sort.Strings(files)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var rep bridge.TimelineReport
		if err := json.Unmarshal(b, &rep); err != nil || len(rep.Samples) == 0 {
			fmt.Fprintf(w, "\ntimeline %s: no samples (%v)\n", f, err)
			continue
		}
		fmt.Fprintf(w, "\ntimeline %s: %d samples (1 in %d, %.1fs)\n", filepath.Base(f), len(rep.Samples), rep.Every, rep.Seconds)
		fmt.Fprint(w, timelineSummary(&rep))
		fmt.Fprint(w, timelineBursts(&rep, 100e6, 5))
	}
}

// timelineSummary is one line per stage: how long messages took to reach
// it from the stage before (ms).
func timelineSummary(rep *bridge.TimelineReport) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "  %-11s %8s %8s %8s %8s\n", "stage", "p50 ms", "p90 ms", "p99 ms", "max ms")
	for _, st := range append(rep.Stages[1:], "total") {
		iv, ok := rep.Intervals[st]
		if !ok {
			continue
		}
		fmt.Fprintf(&sb, "  %-11s %8.3f %8.3f %8.3f %8.3f\n", st, iv["p50"], iv["p90"], iv["p99"], iv["max"])
	}
	return sb.String()
}

// timelineBursts groups samples by the window (width ns) in which they
// were delivered and lists the top windows by the longest stored → acked
// time, each with the stage whose mean wait was largest in it.
func timelineBursts(rep *bridge.TimelineReport, width int64, top int) string {
	type window struct {
		start   int64
		n       int
		worst   float64                             // max stored→acked, ms
		stageMS [len(bridge.TimelineStages)]float64 // summed wait per stage, ms
	}
	ws := map[int64]*window{}
	var t0 int64
	for _, s := range rep.Samples {
		if t0 == 0 || (s[1] != 0 && s[1] < t0) {
			t0 = s[1]
		}
	}
	for _, s := range rep.Samples {
		first := s[0]
		if first == 0 {
			first = s[1]
		}
		k := (s[1] - t0) / width
		win := ws[k]
		if win == nil {
			win = &window{start: k * width}
			ws[k] = win
		}
		win.n++
		last := s[len(s)-1]
		win.worst = max(win.worst, float64(last-first)/1e6)
		prev := int64(0)
		for i, at := range s {
			if at == 0 {
				continue
			}
			if prev != 0 {
				win.stageMS[i] += float64(at-prev) / 1e6
			}
			prev = at
		}
	}
	var list []*window
	for _, win := range ws {
		list = append(list, win)
	}
	slices.SortFunc(list, func(a, b *window) int {
		switch {
		case a.worst > b.worst:
			return -1
		case a.worst < b.worst:
			return 1
		}
		return 0
	})
	var sb strings.Builder
	fmt.Fprintf(&sb, "  worst %dms windows (by delivery time): start s, samples, max stored→acked ms, mean wait per stage ms\n", width/1e6)
	for _, win := range list[:min(top, len(list))] {
		fmt.Fprintf(&sb, "    %6.2fs %4d %8.1f ", float64(win.start)/1e9, win.n, win.worst)
		for i := 1; i < len(win.stageMS); i++ {
			fmt.Fprintf(&sb, " %s %.2f", rep.Stages[i], win.stageMS[i]/float64(win.n))
		}
		sb.WriteString("\n")
	}
	return sb.String()
}
