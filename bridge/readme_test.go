package bridge

import (
	"os"
	"strings"
	"testing"
)

// The README lists every metric with its type, labels and help; alerts,
// dashboards and users read that table, so it must not drift from
// MetricList: the README holds the table rendered from it, verbatim.
func TestREADMEListsEveryMetric(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var table strings.Builder
	table.WriteString("| name | type | labels | help |\n|---|---|---|---|\n")
	for _, d := range MetricList {
		labels := "—"
		if len(d.Labels) > 0 {
			labels = strings.Join(d.Labels, ", ")
		}
		table.WriteString("| " + d.Name + " | " + d.Type + " | " + labels + " | " + d.Help + " |\n")
	}
	if !strings.Contains(string(b), table.String()) {
		t.Errorf("README.md's metrics table differs from MetricList; replace it with:\n%s", table.String())
	}
}
