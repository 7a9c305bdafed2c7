package deployment

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/router"
)

// Record is what one replica publishes in its deployment's registry, and
// what a replica's /status says of it: its status plus who it is.
type Record struct {
	bridge.Status
	// Replica is the replica's id (for a record read over HTTP: its URL).
	Replica string `json:"replica"`
	// Host is the host (pod) it runs on; HTTP its /status address as it
	// knows it.
	Host    string    `json:"host,omitempty"`
	HTTP    string    `json:"http,omitempty"`
	Started time.Time `json:"started"`
	// Updated is when the record was stored (not part of the JSON).
	Updated time.Time `json:"-"`
}

// HeldIn sums the messages the replica holds in shards of ranges, over
// every topic rule, and returns the age in seconds of the oldest.
func (r Record) HeldIn(ranges []router.Range) (n int, oldest float64) {
	for _, rs := range r.Rules {
		for _, h := range rs.HeldShards {
			for _, g := range ranges {
				if h.Shard >= g.From && h.Shard <= g.To {
					n += h.Held
					oldest = max(oldest, h.OldestAgeSeconds)
					break
				}
			}
		}
	}
	return n, oldest
}

// Settled reports whether the replica runs version and publishes nothing
// decided under an older one.
func (r Record) Settled(version int64) bool {
	return r.RulesVersion == version && (r.PublishingVersion == 0 || r.PublishingVersion >= version)
}

// Source lists the live replicas of a deployment.
type Source interface {
	// Replicas returns every live replica's record, sorted by Replica.
	// With a *NoAnswerError it returns the records of the replicas that
	// answered and names those that did not (HTTP).
	Replicas(ctx context.Context) ([]Record, error)
	// Highest is the highest rules version the deployment has run (0
	// when unknown).
	Highest(ctx context.Context) (int64, error)
	// Describe names the source for messages.
	Describe() string
}

// Registry is the Source of a deployment's registry in a lease bucket.
type Registry struct {
	JetStream  jetstream.JetStream
	Bucket     string // "" is natsjs.DefaultLeaseBucket
	Deployment string
}

// Replicas implements Source: the records of the replicas that renewed
// theirs within the bucket's TTL.
func (g *Registry) Replicas(ctx context.Context) ([]Record, error) {
	recs, _, err := natsjs.ReadRegistry(ctx, g.JetStream, g.Bucket, g.Deployment)
	if err != nil {
		return nil, err
	}
	out := make([]Record, 0, len(recs))
	for _, rr := range recs {
		var r Record
		if err := json.Unmarshal(rr.Value, &r); err != nil {
			return nil, fmt.Errorf("deployment %s: the record of replica %s: %w", g.Deployment, rr.ID, err)
		}
		r.Replica, r.Updated = rr.ID, rr.Updated
		out = append(out, r)
	}
	return out, nil
}

// Highest implements Source.
func (g *Registry) Highest(ctx context.Context) (int64, error) {
	_, hw, err := natsjs.ReadRegistry(ctx, g.JetStream, g.Bucket, g.Deployment)
	return hw.Version, err
}

// Describe implements Source.
func (g *Registry) Describe() string {
	b := g.Bucket
	if b == "" {
		b = natsjs.DefaultLeaseBucket
	}
	return fmt.Sprintf("deployment %s (KV bucket %s)", g.Deployment, b)
}

// HTTP is the Source of a fixed list of replicas read over HTTP (/status).
// Every URL names a replica the operator expects: one that does not answer
// is not taken for gone but reported (NoAnswerError), so that whoever waits
// for every replica waits for it too. Highest is the highest version any of
// them runs.
type HTTP struct {
	URLs []string
}

// NoAnswerError is the error of HTTP.Replicas (and Highest) when a replica
// it names does not answer; the records of those that answered come with
// it.
type NoAnswerError struct {
	// Missing says, per replica that did not answer and in the order of
	// the URLs, "URL: no answer: ERR".
	Missing []string
}

func (e *NoAnswerError) Error() string { return strings.Join(e.Missing, "; ") }

// Replicas implements Source: the records of the replicas that answered,
// sorted by Replica (their URL), and a *NoAnswerError naming each one that
// did not (nil when every one answered).
func (h *HTTP) Replicas(ctx context.Context) ([]Record, error) {
	var out []Record
	var missing []string
	for _, u := range h.URLs {
		c := NewBridgeClient(u)
		st, err := c.Status(ctx)
		if err != nil {
			missing = append(missing, fmt.Sprintf("%s: no answer: %v", c.base, err))
			continue
		}
		out = append(out, Record{Status: st, Replica: c.base, HTTP: c.base, Updated: time.Now()})
	}
	slices.SortFunc(out, func(a, b Record) int { return strings.Compare(a.Replica, b.Replica) })
	if len(missing) > 0 {
		return out, &NoAnswerError{Missing: missing}
	}
	return out, nil
}

// Highest implements Source: the highest version of the replicas that
// answered, with Replicas' error.
func (h *HTTP) Highest(ctx context.Context) (int64, error) {
	recs, err := h.Replicas(ctx)
	var v int64
	for _, r := range recs {
		v = max(v, r.RulesVersion)
	}
	return v, err
}

// Describe implements Source.
func (h *HTTP) Describe() string { return "replicas " + strings.Join(h.URLs, ", ") }
