package natsjs

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/retry"
)

// BucketPlan is a JetStream KV bucket the configuration needs: the dedupe
// store's, or the lease bucket (partition leases, the replicas' rules
// versions). A bucket is a stream named "KV_<bucket>"; Check judges an
// existing one.
type BucketPlan struct {
	Bucket string
	// Uses says what needs the bucket, one line each.
	Uses []string
	// Settings describes the bucket for a plan ("ttl 10m, replicas 1").
	Settings string
	// Create creates the bucket as its user would (the same code).
	Create func(ctx context.Context, js jetstream.JetStream) error
	// Check judges an existing bucket's stream configuration: nil update
	// and no refusal when it serves as is; an update (with one line per
	// change) when a change that loses nothing makes it serve; a refusal
	// (why, and what to do) when only a destructive change would.
	Check func(have jetstream.StreamConfig) (update *jetstream.StreamConfig, changes []string, refuse string)
}

// Provision operations, as a plan prints them.
const (
	OpCreate = "create"
	OpUpdate = "update"
	OpOK     = "ok"
	OpSkip   = "not needed" // its subjects are captured by other streams
	OpRefuse = "refused"
	OpNeed   = "needed" // an offline plan: the broker was not asked
)

// Action is one stream or bucket of a Provisioning: what exists, what
// would change and why it is needed.
type Action struct {
	// Object is "stream NAME" or "kv BUCKET".
	Object string
	Op     string
	// Changes lists what Apply changes (create: the settings), one line
	// each; Notes what the operator should know and Apply does not change.
	Changes, Notes []string
	// Uses says what needs the object.
	Uses []string
	// Refused says why the needed change is not made and what to do.
	Refused string

	name   string
	create *jetstream.StreamConfig
	update *jetstream.StreamConfig
	bucket *BucketPlan
	// boundary: report the stream's last sequence after the change (a
	// subject transform changed; docs/partitions.md).
	boundary bool
}

// Provisioning is what a broker needs and how it differs from what the
// broker has (PlanProvision); Apply carries it out.
type Provisioning struct {
	Actions []Action
	js      jetstream.JetStream
	retry   *retry.Policy
}

// ProvisionOptions tunes PlanProvision.
type ProvisionOptions struct {
	// Duplicates is the duplicate window every stream that captures a
	// target or DLQ subject must have at least (an existing shorter one
	// is raised, a longer one kept), and the window of new streams.
	// Default 2m.
	Duplicates time.Duration
	// Replicas of new streams (default 1). With RaiseReplicas, existing
	// streams with fewer are raised to it; more are never lowered.
	Replicas      int
	RaiseReplicas bool
	// Retry, when set, bounds, retries, logs and counts each stream
	// request (internal/retry) until ctx ends; nil: one attempt of at most
	// streamCallTimeout each, for a command that reports the failure.
	Retry *retry.Policy
}

// Refused returns the actions that were refused.
func (p *Provisioning) Refused() []Action {
	var out []Action
	for _, a := range p.Actions {
		if a.Op == OpRefuse {
			out = append(out, a)
		}
	}
	return out
}

// ErrRefused is wrapped by Apply's error when the plan holds a refused
// action: nothing is changed then.
var ErrRefused = errors.New("natsjs: provisioning refused")

// streamState is one stream name's part of a plan.
type streamState struct {
	name     string
	have     *jetstream.StreamConfig // nil: does not exist
	want     jetstream.StreamConfig  // create: the new config; update: have changed
	changes  []string
	notes    []string
	uses     []string
	refused  []string
	boundary bool
}

// PlanProvision reads the broker's streams and compares them with streams
// (PlanStreams) and buckets. It changes nothing. A rule's source stream
// must exist under its name and capture the rule's subject (and carry the
// partition transform of a partitioned rule); a target or DLQ subject may
// be captured by any stream, whose duplicate window must then be at least
// opts.Duplicates. A planned stream whose subjects other streams capture is
// not needed. Changes that would lose something are refused with the
// reason: a subject that overlaps another stream's subjects without being
// captured by them (the server refuses overlaps), a subject transform that
// is not a partition transform, a stream that is a mirror, a bucket that
// needs recreating. Each request has its own timeout within ctx.
func PlanProvision(ctx context.Context, js jetstream.JetStream, streams []StreamPlan, buckets []BucketPlan, opts ProvisionOptions) (*Provisioning, error) {
	if opts.Duplicates <= 0 {
		opts.Duplicates = 2 * time.Minute
	}
	if opts.Replicas <= 0 {
		opts.Replicas = 1
	}
	pr := &provisioner{js: js, opts: opts, byName: map[string]*streamState{}}
	for _, p := range streams {
		if err := pr.plan(ctx, p); err != nil {
			return nil, err
		}
	}
	out := &Provisioning{js: js, retry: opts.Retry}
	for _, name := range pr.order {
		out.Actions = append(out.Actions, pr.byName[name].action())
	}
	for i := range buckets {
		a, err := pr.bucket(ctx, &buckets[i])
		if err != nil {
			return nil, err
		}
		out.Actions = append(out.Actions, a)
	}
	return out, nil
}

// OfflinePlan is the plan without a broker to ask: every stream and bucket
// as needed, with its settings.
func OfflinePlan(streams []StreamPlan, buckets []BucketPlan, opts ProvisionOptions) *Provisioning {
	if opts.Duplicates <= 0 {
		opts.Duplicates = 2 * time.Minute
	}
	if opts.Replicas <= 0 {
		opts.Replicas = 1
	}
	out := &Provisioning{}
	for _, p := range streams {
		cfg := newStreamConfig(p, opts)
		out.Actions = append(out.Actions, Action{Object: "stream " + p.Name, Op: OpNeed, Changes: describeNew(cfg), Uses: p.Uses, name: p.Name})
	}
	for _, b := range buckets {
		out.Actions = append(out.Actions, Action{Object: "kv " + b.Bucket, Op: OpNeed, Changes: []string{b.Settings}, Uses: b.Uses, name: b.Bucket})
	}
	return out
}

type provisioner struct {
	js     jetstream.JetStream
	opts   ProvisionOptions
	byName map[string]*streamState
	order  []string
}

// call runs one request with its own timeout.
func call[T any](ctx context.Context, f func(context.Context) (T, error)) (T, error) {
	cctx, cancel := context.WithTimeout(ctx, streamCallTimeout)
	defer cancel()
	return f(cctx)
}

// retried runs one stream request under pol (bounded, retried, logged and
// counted; internal/retry), or as call does when pol is nil.
func retried[T any](ctx context.Context, pol *retry.Policy, op, on string, f func(context.Context) (T, error)) (T, error) {
	if pol == nil {
		return call(ctx, f)
	}
	return retry.Do(ctx, pol, op, on, f)
}

// stream returns the state of a stream by name, reading it on first use.
func (pr *provisioner) stream(ctx context.Context, name string) (*streamState, error) {
	if s := pr.byName[name]; s != nil {
		return s, nil
	}
	st, err := retried(ctx, pr.opts.Retry, retry.OpStreamInfo, name, func(ctx context.Context) (jetstream.Stream, error) { return pr.js.Stream(ctx, name) })
	s := &streamState{name: name}
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
	case err != nil:
		return nil, fmt.Errorf("natsjs: stream %s: %w", name, err)
	default:
		cfg := st.CachedInfo().Config
		s.have = &cfg
		s.want = cfg
		s.want.Subjects = slices.Clone(cfg.Subjects)
	}
	pr.byName[name] = s
	pr.order = append(pr.order, name)
	return s, nil
}

// capturing lists the existing streams other than self whose subjects
// overlap subj.
func (pr *provisioner) capturing(ctx context.Context, subj, self string) ([]*jetstream.StreamConfig, error) {
	out, err := retried(ctx, pr.opts.Retry, retry.OpStreamInfo, "listening on "+subj, func(ctx context.Context) ([]*jetstream.StreamConfig, error) {
		l := pr.js.ListStreams(ctx, jetstream.WithStreamListSubject(subj))
		var out []*jetstream.StreamConfig
		for info := range l.Info() {
			if info.Config.Name != self {
				cfg := info.Config
				out = append(out, &cfg)
			}
		}
		return out, l.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("natsjs: streams listening on %s: %w", subj, err)
	}
	return out, nil
}

func capturedBy(subjects []string, subj string) bool {
	for _, s := range subjects {
		if covers(s, subj) {
			return true
		}
	}
	return false
}

// plan adds one planned stream.
func (pr *provisioner) plan(ctx context.Context, p StreamPlan) error {
	s, err := pr.stream(ctx, p.Name)
	if err != nil {
		return err
	}
	s.uses = append(s.uses, p.Uses...)
	if s.have != nil && s.have.Mirror != nil {
		s.refused = append(s.refused, fmt.Sprintf("stream %s is a mirror of %s: it cannot capture subjects; name another stream in the rules or delete it", p.Name, s.have.Mirror.Name))
		return nil
	}
	var mine []string
	for _, subj := range p.Subjects {
		if s.have != nil && capturedBy(s.have.Subjects, subj) {
			mine = append(mine, subj)
			continue
		}
		others, err := pr.capturing(ctx, subj, p.Name)
		if err != nil {
			return err
		}
		taken := false
		for _, o := range others {
			switch {
			case capturedBy(o.Subjects, subj) && !p.Source:
				taken = true
				if err := pr.captures(ctx, o.Name, subj, p.Uses); err != nil {
					return err
				}
			case capturedBy(o.Subjects, subj):
				s.refused = append(s.refused, fmt.Sprintf("subject %s is captured by stream %s, but the rules read it from stream %s: name %s as the rule's source.stream, or move the subject", subj, o.Name, p.Name, o.Name))
				taken = true
			default:
				s.refused = append(s.refused, fmt.Sprintf("subject %s overlaps the subjects %v of stream %s without being captured by them, and the server refuses overlapping subjects: let %s capture %s, or change the rules' subject", subj, o.Subjects, o.Name, o.Name, subj))
				taken = true
			}
		}
		if !taken {
			mine = append(mine, subj)
		}
	}
	if s.have == nil {
		if len(mine) == 0 {
			return nil // every subject is captured elsewhere
		}
		p.Subjects = minimalSubjects(append(s.want.Subjects, mine...))
		s.want = newStreamConfig(p, pr.opts)
		return nil
	}
	var add []string
	for _, subj := range mine {
		if !capturedBy(s.want.Subjects, subj) {
			add = append(add, subj)
		}
	}
	if len(add) > 0 {
		s.want.Subjects = minimalSubjects(append(s.want.Subjects, add...))
		s.changes = append(s.changes, "subjects + "+strings.Join(add, ", "))
	}
	if !p.Source {
		pr.window(s)
	}
	if pr.opts.RaiseReplicas && s.want.Replicas < pr.opts.Replicas {
		s.changes = append(s.changes, fmt.Sprintf("replicas %d → %d", s.want.Replicas, pr.opts.Replicas))
		s.want.Replicas = pr.opts.Replicas
	} else if s.want.Replicas > pr.opts.Replicas && pr.opts.RaiseReplicas {
		s.notes = append(s.notes, fmt.Sprintf("keeps %d replicas (never lowered)", s.want.Replicas))
	}
	if p.Source {
		pr.transform(s, p.Transform)
	}
	return nil
}

// captures records that an existing stream other than the planned one
// captures a target or DLQ subject: its window must be long enough.
func (pr *provisioner) captures(ctx context.Context, name, subj string, uses []string) error {
	s, err := pr.stream(ctx, name)
	if err != nil {
		return err
	}
	if s.have == nil {
		return nil // deleted meanwhile; the next plan sees it
	}
	s.notes = appendNew(s.notes, "captures "+subj)
	s.uses = append(s.uses, uses...)
	pr.window(s)
	return nil
}

// window raises an existing stream's duplicate window to the plan's. The
// server refuses a window longer than the stream's max age, and the stream
// forgets a message's id with the message: that is refused here, before
// anything is applied (cellbridge does not shorten or lengthen an
// operator's retention).
func (pr *provisioner) window(s *streamState) {
	if s.want.MaxAge > 0 && s.want.MaxAge < pr.opts.Duplicates {
		s.refused = appendNew(s.refused, fmt.Sprintf("stream %s keeps messages for %s (max age), less than the duplicate window %s the bridge needs (docs/guarantees.md): raise its max age to at least %s by hand",
			s.name, fmtDur(s.want.MaxAge), fmtDur(pr.opts.Duplicates), fmtDur(pr.opts.Duplicates)))
		return
	}
	if s.want.Duplicates < pr.opts.Duplicates {
		s.changes = appendNew(s.changes, fmt.Sprintf("duplicate window %s → %s", fmtDur(s.want.Duplicates), fmtDur(pr.opts.Duplicates)))
		s.want.Duplicates = pr.opts.Duplicates
	}
}

// partitionDest recognises the destination of a PartitionTransform.
var partitionDest = regexp.MustCompile(`^n[0-9]+\.\{\{partition\(`)

// transform sets a source stream's subject transform to want (nil: none),
// refusing to replace one that is not a partition transform.
func (pr *provisioner) transform(s *streamState, want *jetstream.SubjectTransformConfig) {
	got := s.want.SubjectTransform
	same := (got == nil && want == nil) || (got != nil && want != nil && got.Source == want.Source && got.Destination == want.Destination)
	if same {
		return
	}
	if got != nil && !partitionDest.MatchString(got.Destination) {
		s.refused = append(s.refused, fmt.Sprintf("stream %s has the subject transform %q → %q, which cellbridge did not set; every reader of the stream sees its subjects: change it by hand (docs/partitions.md)", s.name, got.Source, got.Destination))
		return
	}
	from := "none"
	if got != nil {
		from = fmt.Sprintf("%q → %q", got.Source, got.Destination)
	}
	to := "none"
	if want != nil {
		to = fmt.Sprintf("%q → %q", want.Source, want.Destination)
	}
	s.changes = append(s.changes, "subject transform "+from+" becomes "+to)
	s.notes = append(s.notes, "events stored before the change keep their subjects: follow the partition cut-over in docs/partitions.md")
	s.want.SubjectTransform = want
	s.boundary = true
}

func (s *streamState) action() Action {
	a := Action{Object: "stream " + s.name, Uses: s.uses, Notes: s.notes, name: s.name, boundary: s.boundary}
	switch {
	case len(s.refused) > 0:
		a.Op, a.Refused = OpRefuse, strings.Join(s.refused, "; ")
	case s.have == nil && len(s.want.Subjects) == 0:
		a.Op = OpSkip
	case s.have == nil:
		a.Op, a.Changes = OpCreate, describeNew(s.want)
		cfg := s.want
		a.create = &cfg
	case len(s.changes) > 0:
		a.Op, a.Changes = OpUpdate, s.changes
		cfg := s.want
		a.update = &cfg
	default:
		a.Op = OpOK
	}
	return a
}

func (pr *provisioner) bucket(ctx context.Context, b *BucketPlan) (Action, error) {
	a := Action{Object: "kv " + b.Bucket, Uses: b.Uses, name: "KV_" + b.Bucket, bucket: b}
	st, err := retried(ctx, pr.opts.Retry, retry.OpStreamInfo, "KV_"+b.Bucket, func(ctx context.Context) (jetstream.Stream, error) { return pr.js.Stream(ctx, "KV_"+b.Bucket) })
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		a.Op, a.Changes = OpCreate, []string{b.Settings}
		return a, nil
	case err != nil:
		return a, fmt.Errorf("natsjs: kv %s: %w", b.Bucket, err)
	}
	update, changes, refuse := b.Check(st.CachedInfo().Config)
	switch {
	case refuse != "":
		a.Op, a.Refused = OpRefuse, refuse
	case update != nil:
		a.Op, a.Changes, a.update = OpUpdate, changes, update
	default:
		a.Op = OpOK
	}
	return a, nil
}

// Apply creates and updates what the plan says, in its order, unless an
// action was refused: then it changes nothing and its error wraps
// ErrRefused. It stops at the first failure. A changed subject transform
// adds the stream's last sequence at the change to the action's notes.
func (p *Provisioning) Apply(ctx context.Context) error {
	if p.js == nil {
		return errors.New("natsjs: an offline plan cannot be applied")
	}
	if r := p.Refused(); len(r) > 0 {
		var why []string
		for _, a := range r {
			why = append(why, a.Object+": "+a.Refused)
		}
		return fmt.Errorf("%w: %s", ErrRefused, strings.Join(why, "; "))
	}
	for i := range p.Actions {
		a := &p.Actions[i]
		var err error
		switch {
		case a.Op == OpCreate && a.bucket != nil:
			err = a.bucket.Create(ctx, p.js)
		case a.Op == OpCreate:
			_, err = retried(ctx, p.retry, retry.OpStreamCreate, a.create.Name, func(ctx context.Context) (jetstream.Stream, error) { return p.js.CreateStream(ctx, *a.create) })
		case a.Op == OpUpdate:
			var st jetstream.Stream
			st, err = retried(ctx, p.retry, retry.OpStreamUpdate, a.update.Name, func(ctx context.Context) (jetstream.Stream, error) { return p.js.UpdateStream(ctx, *a.update) })
			if err == nil && a.boundary {
				a.Notes = append(a.Notes, fmt.Sprintf("last sequence at the change: %d (every later event carries the new subjects)", st.CachedInfo().State.LastSeq))
			}
		}
		if err != nil {
			return fmt.Errorf("natsjs: %s %s: %w", a.Op, a.Object, err)
		}
	}
	return nil
}

// newStreamConfig is the configuration of a stream the plan creates.
func newStreamConfig(p StreamPlan, opts ProvisionOptions) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:             p.Name,
		Subjects:         p.Subjects,
		Storage:          jetstream.FileStorage,
		Replicas:         opts.Replicas,
		Duplicates:       opts.Duplicates,
		SubjectTransform: p.Transform,
	}
}

func describeNew(c jetstream.StreamConfig) []string {
	out := []string{fmt.Sprintf("subjects %s; duplicate window %s; replicas %d; %s storage",
		strings.Join(c.Subjects, ", "), fmtDur(c.Duplicates), c.Replicas, strings.ToLower(c.Storage.String()))}
	if t := c.SubjectTransform; t != nil {
		out = append(out, fmt.Sprintf("subject transform %q → %q", t.Source, t.Destination))
	}
	return out
}

func appendNew(list []string, s string) []string {
	if slices.Contains(list, s) {
		return list
	}
	return append(list, s)
}

// fmtDur renders 2m0s as 2m and 1h0m0s as 1h.
func fmtDur(d time.Duration) string { return FormatDuration(d) }

// FormatDuration renders a duration for plans and messages: 2m0s as 2m,
// 1h0m0s as 1h.
func FormatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// RedactURL returns a broker URL, or a comma-separated list of them, with
// every password replaced by "xxxxx", for messages and plans.
func RedactURL(s string) string {
	parts := strings.Split(s, ",")
	for i, p := range parts {
		parts[i] = redactURL(strings.TrimSpace(p))
	}
	return strings.Join(parts, ",")
}
