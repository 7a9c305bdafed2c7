package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestRenderOverlays(t *testing.T) {
	for _, dir := range []string{"../overlays/single-region", "../overlays/production"} {
		var out, errb bytes.Buffer
		if code := run([]string{dir}, &out, &errb); code != 0 {
			t.Fatalf("%s: exit %d: %s", dir, code, errb.String())
		}
		for _, kind := range []string{"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ConfigMap"} {
			if !strings.Contains(out.String(), "\nkind: "+kind+"\n") {
				t.Errorf("%s: no %s in the output", dir, kind)
			}
		}
	}
	if code := run(nil, &bytes.Buffer{}, &bytes.Buffer{}); code != 2 {
		t.Errorf("no argument: exit %d, want 2", code)
	}
	var errb bytes.Buffer
	if code := run([]string{"../no-such-overlay"}, &bytes.Buffer{}, &errb); code != 1 || !strings.Contains(errb.String(), "no-such-overlay") {
		t.Errorf("missing overlay: exit %d, stderr %q", code, errb.String())
	}
}
