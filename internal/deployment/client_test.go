package deployment

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestSumMetric(t *testing.T) {
	text := `# HELP x
cellbridge_forwarded_total{cell="rz00",rule="orders"} 3
cellbridge_forwarded_total{cell="rz01",rule="orders"} 4
cellbridge_forwarded_total{cell="rz01",rule="payments"} 5
cellbridge_forwarded_totalx 100
cellbridge_rules_reload_failures_total 2
`
	if got := sumMetric(text, "cellbridge_forwarded_total", map[string]string{"rule": "orders"}); got != 7 {
		t.Errorf("orders: %v", got)
	}
	if got := sumMetric(text, "cellbridge_rules_reload_failures_total", nil); got != 2 {
		t.Errorf("failures: %v", got)
	}
}
