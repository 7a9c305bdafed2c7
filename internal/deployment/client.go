package deployment

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/cellbridge/cellbridge/bridge"
)

// BridgeClient reads a running bridge's HTTP endpoints (/status, /readyz,
// /metrics). Every request is bounded by its context and by a 5s timeout.
// Safe for concurrent use.
type BridgeClient struct {
	base string
	hc   *http.Client
}

// NewBridgeClient reads the bridge at base: http(s)://host:port, or
// host:port.
func NewBridgeClient(base string) *BridgeClient {
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	return &BridgeClient{base: strings.TrimRight(base, "/"), hc: &http.Client{Timeout: 5 * time.Second}}
}

// Get GETs path ("/healthz") and returns the status code and the body.
func (b *BridgeClient) Get(ctx context.Context, path string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.base+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := b.hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}

func (b *BridgeClient) get(ctx context.Context, path string) ([]byte, error) {
	code, body, err := b.Get(ctx, path)
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %d %s: %s", path, code, http.StatusText(code), strings.TrimSpace(string(body)))
	}
	return body, nil
}

// Ready asks /readyz: true on 200, false on 503 with the body's reasons;
// an error when the bridge does not answer, or answers anything else.
func (b *BridgeClient) Ready(ctx context.Context) (bool, string, error) {
	code, body, err := b.Get(ctx, "/readyz")
	if err != nil {
		return false, "", err
	}
	switch code {
	case http.StatusOK:
		return true, strings.TrimSpace(string(body)), nil
	case http.StatusServiceUnavailable:
		return false, strings.TrimSpace(string(body)), nil
	}
	return false, "", fmt.Errorf("GET /readyz: %d %s: %s", code, http.StatusText(code), strings.TrimSpace(string(body)))
}

// Status fetches /status.
func (b *BridgeClient) Status(ctx context.Context) (bridge.Status, error) {
	var st bridge.Status
	body, err := b.get(ctx, "/status")
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(body, &st); err != nil {
		return st, fmt.Errorf("/status: %w", err)
	}
	return st, nil
}

// Metric returns the sum of every sample of the named metric in /metrics
// whose labels include want (nil: all samples).
func (b *BridgeClient) Metric(ctx context.Context, name string, want map[string]string) (float64, error) {
	body, err := b.get(ctx, "/metrics")
	if err != nil {
		return 0, err
	}
	return sumMetric(string(body), name, want), nil
}

// sumMetric sums the samples of a metric in the Prometheus text format whose
// labels include want.
func sumMetric(text, name string, want map[string]string) float64 {
	var sum float64
	for _, s := range MetricSamples(text, name) {
		match := true
		for k, v := range want {
			if s.Labels[k] != v {
				match = false
			}
		}
		if match {
			sum += s.Value
		}
	}
	return sum
}

// Sample is one sample of a counter or gauge.
type Sample struct {
	Labels map[string]string
	Value  float64
}

// MetricSamples returns the samples of the counter or gauge name in a
// /metrics body (Prometheus text format); none when it is absent or the
// body does not parse.
func MetricSamples(text, name string) []Sample {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return nil
	}
	mf := fams[name]
	if mf == nil {
		return nil
	}
	var out []Sample
	for _, m := range mf.GetMetric() {
		s := Sample{Labels: map[string]string{}}
		for _, lp := range m.GetLabel() {
			s.Labels[lp.GetName()] = lp.GetValue()
		}
		switch {
		case m.GetCounter() != nil:
			s.Value = m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			s.Value = m.GetGauge().GetValue()
		case m.GetUntyped() != nil:
			s.Value = m.GetUntyped().GetValue()
		default:
			continue
		}
		out = append(out, s)
	}
	return out
}
