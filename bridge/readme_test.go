package bridge

import (
	"os"
	"strings"
	"testing"
)

// The README lists every metric with its labels; alerts, dashboards and
// users read that table, so it must not drift from MetricList.
func TestREADMEListsEveryMetric(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	for _, d := range MetricList {
		labels := "—"
		if len(d.Labels) > 0 {
			labels = strings.Join(d.Labels, ", ")
		}
		row := "| " + d.Name + " | " + d.Type + " | " + labels + " |"
		if !strings.Contains(readme, row) {
			t.Errorf("README.md has no metrics row %q (regenerate the table from bridge.MetricTable())", row)
		}
	}
}
