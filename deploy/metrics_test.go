package deploy

import (
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/cellbridge/cellbridge/bridge"
)

// exportedMetrics returns every series name the bridge exports (bridge.MetricList, the single list of
// metrics; a histogram adds its _bucket, _sum and _count series), plus `up`, which Prometheus adds to
// every scraped target.
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	names := map[string]bool{"up": true}
	for _, d := range bridge.MetricList {
		names[d.Name] = true
		if d.Type == "histogram" {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[d.Name+s] = true
			}
		}
	}
	if len(names) < 2 {
		t.Fatal("bridge.MetricList is empty")
	}
	return names
}

var (
	promqlStrings   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	promqlMatchers  = regexp.MustCompile(`\{[^}]*\}`)
	promqlRanges    = regexp.MustCompile(`\[[^\]]*\]`)
	promqlLabelList = regexp.MustCompile(`(?i)\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlIdent     = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*`)
	promqlKeywords  = []string{"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
		"group_left", "group_right", "inf", "nan", "atan2"}
)

// promqlMetrics returns the metric names a PromQL expression selects. It is no full parser but enough
// for the expressions deploy/ writes: it drops strings, label matchers, ranges and label lists, then
// every identifier that is not a keyword and not followed by "(" (a function or aggregation) is a
// metric name. Grafana variables ($job, ${__rate_interval}) are dropped first.
func promqlMetrics(expr string) []string {
	expr = regexp.MustCompile(`\$\{[^}]*\}|\$[A-Za-z_]+`).ReplaceAllString(expr, "")
	expr = promqlStrings.ReplaceAllString(expr, `""`)
	expr = promqlMatchers.ReplaceAllString(expr, " ")
	expr = promqlRanges.ReplaceAllString(expr, " ")
	expr = promqlLabelList.ReplaceAllString(expr, " ")
	var names []string
	for _, loc := range promqlIdent.FindAllStringIndex(expr, -1) {
		id := expr[loc[0]:loc[1]]
		rest := strings.TrimSpace(expr[loc[1]:])
		// Digits before an identifier make it a number or a duration (5m, 1e3).
		if loc[0] > 0 && strings.ContainsAny(expr[loc[0]-1:loc[0]], "0123456789.") {
			continue
		}
		if strings.HasPrefix(rest, "(") || slices.Contains(promqlKeywords, strings.ToLower(id)) {
			continue
		}
		if !slices.Contains(names, id) {
			names = append(names, id)
		}
	}
	return names
}

func TestPromqlMetrics(t *testing.T) {
	for expr, want := range map[string][]string{
		`absent(up{job="cellbridge"} == 1)`: {"up"},
		`sum by (namespace, rule) (rate(cellbridge_messages_total{outcome=~"a|b"}[10m])) > 0 unless on (rule) x_y`:            {"cellbridge_messages_total", "x_y"},
		`histogram_quantile(0.99, sum by (le, cell) (rate(cellbridge_latency_seconds_bucket{job="$job"}[$__rate_interval])))`: {"cellbridge_latency_seconds_bucket"},
		`max(cellbridge_rules_version) != min(cellbridge_rules_version) offset 5m`:                                            {"cellbridge_rules_version"},
		`time() - max by (pod) (cellbridge_rules_last_reload_timestamp_seconds{namespace=~"${namespace}"})`:                   {"cellbridge_rules_last_reload_timestamp_seconds"},
	} {
		if got := promqlMetrics(expr); !slices.Equal(got, want) {
			t.Errorf("promqlMetrics(%s) = %v, want %v", expr, got, want)
		}
	}
}
