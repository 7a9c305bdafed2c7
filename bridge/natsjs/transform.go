package natsjs

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/router"
)

// PartitionPrefixTokens is how many tokens a partitioned stream puts in
// front of every subject it stores: "n<N>" and the partition number. A
// partitioned source removes them before routing, so that keys, rules and
// forwarded subjects see the producer's subject.
const PartitionPrefixTokens = 2

// PartitionTransform returns the subject transform a stream needs so that
// a rule reading subject, keyed by subject token token, can read it in n
// partitions:
//
//	source:      the rule's subject, e.g. "orders.*.>"
//	destination: "n<n>.{{partition(n,w)}}." + the subject with its i-th '*'
//	             written as {{wildcard(i)}}, e.g.
//	             "n12.{{partition(12,1)}}.orders.{{wildcard(1)}}.>"
//
// where w is the ordinal of the key token among the subject's '*' tokens
// (router.KeyWildcard: the server's indexes count wildcards, not tokens).
// The partition is a whole token of its own because a transform function
// must fill a whole token; the "n<n>" token keeps the subjects of every
// partition count apart, so that a stream can move to another count without
// one generation's consumers reading the other's messages. It fails when
// the key token is not a '*' of subject or n is out of range.
func PartitionTransform(subject string, token, n int) (jetstream.SubjectTransformConfig, error) {
	if n < 1 || n > router.MaxPartitions {
		return jetstream.SubjectTransformConfig{}, fmt.Errorf("natsjs: partitions must be between 1 and %d, not %d", router.MaxPartitions, n)
	}
	w, err := router.KeyWildcard(subject, token)
	if err != nil {
		return jetstream.SubjectTransformConfig{}, fmt.Errorf("natsjs: partition transform: %w", err)
	}
	toks := strings.Split(subject, ".")
	var b strings.Builder
	fmt.Fprintf(&b, "n%d.{{partition(%d,%d)}}", n, n, w)
	i := 0
	for _, t := range toks {
		b.WriteByte('.')
		if t == "*" {
			i++
			fmt.Fprintf(&b, "{{wildcard(%d)}}", i)
			continue
		}
		b.WriteString(t)
	}
	return jetstream.SubjectTransformConfig{Source: subject, Destination: b.String()}, nil
}

// RuleTransform is PartitionTransform for a partitioned topic rule; it
// fails for a rule that is not partitioned.
func RuleTransform(r *router.Rule) (jetstream.SubjectTransformConfig, error) {
	if r.Source.Partitions <= 0 || !r.Source.IsNATS() {
		return jetstream.SubjectTransformConfig{}, fmt.Errorf("natsjs: rule %s is not a partitioned NATS rule", r.Name)
	}
	tr, err := PartitionTransform(r.Source.Subject, r.Key.SubjectToken, r.Source.Partitions)
	if err != nil {
		return tr, fmt.Errorf("rule %s: %w", r.Name, err)
	}
	return tr, nil
}

// PartitionDurable names partition p's durable consumer of a rule with
// consumer group group and n partitions: "<group>-n<n>-p<p>". The count is
// part of the name so that consumers of two partition counts never share
// an ack floor.
func PartitionDurable(group string, n, p int) string {
	return group + "-n" + strconv.Itoa(n) + "-p" + strconv.Itoa(p)
}

// PartitionFilter is partition p's consumer filter among n partitions:
// "n<n>.<p>.>", every subject the stream stored in that partition.
func PartitionFilter(n, p int) string {
	return "n" + strconv.Itoa(n) + "." + strconv.Itoa(p) + ".>"
}

// ErrTransformMismatch is wrapped by CheckTransform's errors when a
// stream does not carry the subject transform a partitioned rule needs.
var ErrTransformMismatch = errors.New("natsjs: stream subject transform mismatch")

// CheckTransform reports whether the stream configuration carries want.
// Its error wraps ErrTransformMismatch and says what the stream has, what
// it needs and how to apply it (`cellbridge streams -apply`, or the nats
// CLI). A partitioned source refuses to start on such a stream: its
// consumers would read nothing, or read subjects partitioned differently
// from what its replicas expect.
func CheckTransform(cfg *jetstream.StreamConfig, want jetstream.SubjectTransformConfig) error {
	got := cfg.SubjectTransform
	if got != nil && got.Source == want.Source && got.Destination == want.Destination {
		return nil
	}
	has := "none"
	if got != nil {
		has = fmt.Sprintf("%q → %q", got.Source, got.Destination)
	}
	return fmt.Errorf("%w: stream %s has subject transform %s, but needs %q → %q; apply it with `cellbridge streams -apply` or `nats stream edit %s --transform-source '%s' --transform-destination '%s'` (when the stream already holds events, follow the partition cut-over in docs/partitions.md)",
		ErrTransformMismatch, cfg.Name, has, want.Source, want.Destination, cfg.Name, want.Source, want.Destination)
}

// streamCallTimeout bounds each stream info or update request made here, so
// that a slow or leaderless stream fails one call, not a whole start-up.
const streamCallTimeout = 5 * time.Second

// CheckStreamTransform reads the stream's configuration and checks it with
// CheckTransform. Each request has its own short timeout within ctx.
func CheckStreamTransform(ctx context.Context, js jetstream.JetStream, stream string, want jetstream.SubjectTransformConfig) error {
	cctx, cancel := context.WithTimeout(ctx, streamCallTimeout)
	defer cancel()
	st, err := js.Stream(cctx, stream)
	if err != nil {
		return fmt.Errorf("natsjs: stream %s: %w", stream, err)
	}
	cfg := st.CachedInfo().Config
	return CheckTransform(&cfg, want)
}

// TransformChange describes what ApplyStreamTransform did.
type TransformChange struct {
	Stream string
	// Old is the transform the stream had before (nil: none).
	Old *jetstream.SubjectTransformConfig
	// New is the transform the stream has now.
	New jetstream.SubjectTransformConfig
	// Changed is false when the stream already had New.
	Changed bool
	// LastSeq is the stream's last sequence right after the change: every
	// later message is stored under New (the boundary of a partition
	// cut-over, docs/partitions.md).
	LastSeq uint64
}

// ApplyStreamTransform sets the stream's subject transform to want (an
// update of the stream's configuration, nothing else changes) unless it
// already has it. The stream must exist. Each request has its own short
// timeout within ctx.
func ApplyStreamTransform(ctx context.Context, js jetstream.JetStream, stream string, want jetstream.SubjectTransformConfig) (TransformChange, error) {
	ch := TransformChange{Stream: stream, New: want}
	cctx, cancel := context.WithTimeout(ctx, streamCallTimeout)
	st, err := js.Stream(cctx, stream)
	cancel()
	if err != nil {
		return ch, fmt.Errorf("natsjs: stream %s: %w", stream, err)
	}
	info := st.CachedInfo()
	cfg := info.Config
	ch.Old, ch.LastSeq = cfg.SubjectTransform, info.State.LastSeq
	if CheckTransform(&cfg, want) == nil {
		return ch, nil
	}
	cfg.SubjectTransform = &want
	cctx, cancel = context.WithTimeout(ctx, streamCallTimeout)
	up, err := js.UpdateStream(cctx, cfg)
	cancel()
	if err != nil {
		return ch, fmt.Errorf("natsjs: stream %s: set subject transform %q → %q: %w", stream, want.Source, want.Destination, err)
	}
	ch.Changed, ch.LastSeq = true, up.CachedInfo().State.LastSeq
	return ch, nil
}
