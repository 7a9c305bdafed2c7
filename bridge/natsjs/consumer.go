package natsjs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/retry"
)

// ModeError says that the durable is set up for another ordering mode than
// the source's and that other clients pull from it, so the source does not
// switch it (see SourceConfig.Ordering).
type ModeError struct {
	Rule, Stream, Consumer string
	// Have describes the durable's priority settings (and ack policy when
	// that is what differs), Want the source's mode and Cumulative its
	// acks.
	Have       string
	Want       Ordering
	Cumulative bool
	// Waiting is the number of pull requests waiting on the durable.
	Waiting int
	// OtherRule, when set, is the rule the durable's description names:
	// the durable is that rule's, with another filter (Have says which),
	// and its clients pull from it.
	OtherRule string
}

func (e *ModeError) Error() string {
	if e.OtherRule != "" {
		return fmt.Sprintf("natsjs: rule %s: consumer %s on stream %s is %s, and %d pull requests of its clients wait on it; "+
			"not changing its filter under them: this replica waits until they stop (a rule renamed or split keeping its "+
			"source.group; or two deployments whose rules share a group on this stream: give each its own group)",
			e.Rule, e.Consumer, e.Stream, e.Have, e.Waiting)
	}
	acks := ""
	if e.Cumulative {
		acks = ", acks cumulative"
	}
	return fmt.Sprintf("natsjs: rule %s: consumer %s on stream %s is %s, this replica is configured for ordering %q%s, "+
		"and %d pull requests of other clients wait on it; not switching it under them: this replica waits until they stop. "+
		"Give every replica of the rule the same source.ordering and source.acks (or finish the rolling change); "+
		"see docs for switching the mode", e.Rule, e.Consumer, e.Stream, e.Have, e.Want, acks, e.Waiting)
}

// rulePrefix starts the description of a rule's durable; the rule's name
// follows.
const rulePrefix = "cellbridge rule "

// consumerConfig is the durable as the source wants it.
func (s *Source) consumerConfig() jetstream.ConsumerConfig {
	cfg := jetstream.ConsumerConfig{
		Durable:     s.cfg.Durable,
		Description: rulePrefix + s.cfg.Rule,
		AckPolicy:   s.ackPolicy(),
		// Held messages are negatively acknowledged again and again until
		// their shard is unblocked, and sink outages are retried, so a
		// delivery limit would eventually drop good messages.
		MaxDeliver:    -1,
		FilterSubject: s.cfg.Subject,
		AckWait:       s.cfg.AckWait,
		MaxAckPending: s.cfg.MaxAckPending,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	}
	if s.cfg.Ordering == Ordered {
		cfg.PriorityGroups = []string{s.cfg.Group}
		cfg.PriorityPolicy = jetstream.PriorityPolicyPinned
		cfg.PinnedTTL = s.cfg.PinnedTTL
	}
	return cfg
}

// ackPolicy is the durable's ack policy as the source wants it.
func (s *Source) ackPolicy() jetstream.AckPolicy {
	if s.cfg.CumulativeAcks {
		return jetstream.AckAllPolicy
	}
	return jetstream.AckExplicitPolicy
}

// modeOf describes a durable's priority settings: the source's own mode
// when they match it, else what they are. A durable whose ack policy is not
// the source's is in another mode too.
func (s *Source) modeOf(c *jetstream.ConsumerConfig) (Ordering, string) {
	if c.AckPolicy != s.ackPolicy() {
		policy, _ := c.AckPolicy.MarshalJSON()
		return "", fmt.Sprintf("set up with ack policy %s (source.acks: cumulative is ack policy all, each is explicit)", policy)
	}
	switch {
	case c.PriorityPolicy == jetstream.PriorityPolicyNone && len(c.PriorityGroups) == 0:
		return Unordered, "unordered (no priority policy)"
	case c.PriorityPolicy == jetstream.PriorityPolicyPinned && slices.Contains(c.PriorityGroups, s.cfg.Group):
		return Ordered, "ordered (pinned priority group " + s.cfg.Group + ")"
	}
	policy, _ := c.PriorityPolicy.MarshalJSON()
	return "", fmt.Sprintf("set up with priority policy %s and groups %v", policy, c.PriorityGroups)
}

// ensureConsumer creates or updates the durable. Where it starts is kept
// from an existing consumer (the server refuses to change it, and an
// operator may have created the durable with DeliverNew to skip history);
// a new one starts at the stream's first message, or after floor when the
// consumer vanished while running, so that its history is not replayed.
//
// An existing durable in another ordering mode is switched in place only
// when no pull request waits on it: a pull request means a client of the
// other mode (an older version, a replica not yet reconfigured) is running,
// and switching the durable under it would make it switch the durable back.
// Then ensureConsumer returns a *ModeError, keeps the existing Consumer for
// monitoring and puts the source into StateWaiting. (A client between two
// pulls can be missed; it then finds its pulls refused, and the next
// ensureConsumer of either side sees its requests again.)
func (s *Source) ensureConsumer(ctx context.Context, floor uint64) (jetstream.Consumer, error) {
	return s.ensureConsumerAfter(ctx, floor, false)
}

// recreateConsumer is ensureConsumer for a source whose durable was
// deleted, or whose consuming stopped, while it ran: it starts after floor
// if the durable is gone. The server tells a deleted durable's clients
// before it is gone from the API, and removes its files after that: for a
// moment the old durable is still found (and would be updated in place, or
// taken as the existing one, whose "deliver all" start the new durable
// would copy, replaying the stream), and a new one made too early can start
// with a wrong ack floor or fail every later update. So nothing is made for
// vanishSettle; then the durable this source last held, recognised by its
// creation time, is waited for to go away (looked at every vanishPoll for
// up to vanishWait; one that stays was not deleted and is kept), and a
// create that fails (another replica made the durable first, with its own
// start) is tried again within the same bound, finding the other's.
func (s *Source) recreateConsumer(ctx context.Context, floor uint64) (jetstream.Consumer, error) {
	return s.ensureConsumerAfter(ctx, floor, true)
}

const (
	vanishWait = 2 * time.Second
	vanishPoll = 50 * time.Millisecond
	// vanishSettle is how long a durable that was deleted is left alone
	// before one of the same name is made: the server removes the old
	// one's files after it answered, and a new durable made meanwhile can
	// start with a wrong ack floor or fail every later update ("meta.inf:
	// no such file").
	vanishSettle = 250 * time.Millisecond
)

// sameConsumer reports whether the durable have already is want, in every
// field the source sets, with the fields it leaves alone at their
// defaults (ensureConsumer then sends no update).
func sameConsumer(want, have jetstream.ConsumerConfig) bool {
	return want.Durable == have.Durable && want.Description == have.Description && want.AckPolicy == have.AckPolicy &&
		want.MaxDeliver == have.MaxDeliver && want.FilterSubject == have.FilterSubject && len(have.FilterSubjects) == 0 &&
		want.AckWait == have.AckWait && want.MaxAckPending == have.MaxAckPending &&
		want.DeliverPolicy == have.DeliverPolicy && want.OptStartSeq == have.OptStartSeq &&
		(want.OptStartTime == nil) == (have.OptStartTime == nil) && (want.OptStartTime == nil || want.OptStartTime.Equal(*have.OptStartTime)) &&
		slices.Equal(want.PriorityGroups, have.PriorityGroups) && want.PriorityPolicy == have.PriorityPolicy &&
		want.PinnedTTL == have.PinnedTTL &&
		// Fields the source leaves at their defaults, which an operator
		// may have changed by hand: an update puts them back.
		!have.HeadersOnly && have.InactiveThreshold == 0 && have.MaxRequestBatch == 0 && have.MaxRequestExpires == 0 &&
		have.MaxRequestMaxBytes == 0 && len(have.BackOff) == 0 && have.SampleFrequency == "" && have.RateLimit == 0
}

// errVanishing: the durable found is the one this source last held, and
// it was reported deleted (recreateConsumer waits for it to go).
var errVanishing = errors.New("the durable is being deleted")

func (s *Source) ensureConsumerAfter(ctx context.Context, floor uint64, gone bool) (jetstream.Consumer, error) {
	var held time.Time
	if gone {
		s.mu.Lock()
		if s.cons != nil {
			held = s.cons.CachedInfo().Created
		}
		s.mu.Unlock()
	}
	if gone && !sleepCtx(ctx, vanishSettle) {
		return nil, ctx.Err()
	}
	deadline := time.Now().Add(vanishWait)
	for {
		wait := gone && time.Now().Before(deadline)
		cons, err := s.ensureConsumerOnce(ctx, floor, held, wait)
		var me *ModeError
		if errors.Is(err, errVanishing) || (wait && err != nil && ctx.Err() == nil && !errors.As(err, &me)) {
			// Still being deleted; or found gone, then created by
			// another replica first (with its own start, which this
			// create cannot change), or updated in place as it went:
			// the next look finds out which.
			s.log.Debug("nats consumer being deleted or created by another client; looking again", "err", err)
			if !sleepCtx(ctx, vanishPoll) {
				return nil, ctx.Err()
			}
			continue
		}
		return cons, err
	}
}

// ensureConsumerOnce is one attempt of ensureConsumerAfter: with wait, a
// durable created at held (the one this source held) is errVanishing.
func (s *Source) ensureConsumerOnce(ctx context.Context, floor uint64, held time.Time, wait bool) (jetstream.Consumer, error) {
	cfg := s.consumerConfig()
	old, err := retry.Do(ctx, s.pol, retry.OpConsumerInfo, s.consumerName(), func(ctx context.Context) (jetstream.Consumer, error) {
		return s.js.Consumer(ctx, s.cfg.Stream, s.cfg.Durable)
	})
	switch {
	case err == nil:
		info := old.CachedInfo()
		oc := info.Config
		if other, ok := strings.CutPrefix(oc.Description, rulePrefix); ok && other != s.cfg.Rule && oc.FilterSubject != cfg.FilterSubject {
			// Another rule's durable with another filter: a rule renamed
			// or split that kept its group (a rolling change), or two
			// deployments whose rules share a group on this stream. While
			// its clients pull, updating the filter would take the other
			// rule's messages from them: wait, as for a mode change. Once
			// none pulls, take it over (a rule set itself cannot hold
			// two rules on one group: the rules' validation refuses it).
			if info.NumWaiting > 0 {
				me := &ModeError{Rule: s.cfg.Rule, Stream: s.cfg.Stream, Consumer: s.cfg.Durable,
					Have: fmt.Sprintf("rule %s's (filter %s)", other, oc.FilterSubject), Want: s.cfg.Ordering,
					Cumulative: s.cfg.CumulativeAcks, Waiting: info.NumWaiting, OtherRule: other}
				s.mu.Lock()
				s.cons, s.conflict = old, me
				s.mu.Unlock()
				return nil, me
			}
			s.log.Warn("nats consumer of another rule taken over: its filter changes", "from_rule", other,
				"from_filter", oc.FilterSubject, "filter", cfg.FilterSubject)
		}
		if wait && !held.IsZero() && info.Created.Equal(held) {
			// The durable this source held: being deleted, unless it
			// was switched to the other mode in place (then it stays,
			// and is handled below at once).
			if have, _ := s.modeOf(&oc); have == s.cfg.Ordering {
				return nil, errVanishing
			}
		}
		if have, desc := s.modeOf(&oc); have != s.cfg.Ordering {
			if info.NumWaiting > 0 {
				me := &ModeError{Rule: s.cfg.Rule, Stream: s.cfg.Stream, Consumer: s.cfg.Durable, Have: desc,
					Want: s.cfg.Ordering, Cumulative: s.cfg.CumulativeAcks, Waiting: info.NumWaiting}
				s.mu.Lock()
				s.cons, s.conflict = old, me
				s.mu.Unlock()
				return nil, me
			}
			s.log.Warn("nats consumer switched to this replica's ordering mode", "from", desc, "ordering", s.cfg.Ordering,
				"cumulativeAcks", s.cfg.CumulativeAcks)
		}
		cfg.DeliverPolicy, cfg.OptStartSeq, cfg.OptStartTime = oc.DeliverPolicy, oc.OptStartSeq, oc.OptStartTime
		if sameConsumer(cfg, oc) {
			// Nothing to change: no update (each one rewrites the
			// durable's metadata on the server).
			s.mu.Lock()
			s.cons, s.conflict = old, nil
			s.mu.Unlock()
			return old, nil
		}
		if oc.AckPolicy != cfg.AckPolicy {
			// The server does not change a consumer's ack policy: the
			// durable is made again, starting after its ack floor
			// (what it acknowledged above the floor one by one is
			// forwarded again and dropped by its idempotency key).
			floor := info.AckFloor.Stream
			if err := s.deleteConsumer(ctx); err != nil {
				return nil, err
			}
			if !sleepCtx(ctx, vanishSettle) {
				return nil, ctx.Err()
			}
			// Also at floor 0 (nothing acknowledged yet): a durable made
			// with DeliverNew or DeliverLast on an empty stream starts
			// there, and its own policy would skip what it delivered
			// and no one acknowledged. A durable that starts at a
			// sequence (made again after a loss) may report a floor
			// below its start: it starts there again, not earlier.
			start := floor + 1
			if belowStart(&oc, start) {
				start = oc.OptStartSeq
			}
			cfg.DeliverPolicy, cfg.OptStartSeq, cfg.OptStartTime = jetstream.DeliverByStartSequencePolicy, start, nil
			s.log.Warn("nats consumer recreated for its new ack policy", "cumulativeAcks", s.cfg.CumulativeAcks, "startSeq", cfg.OptStartSeq)
		}
	case errors.Is(err, jetstream.ErrConsumerNotFound):
		if floor > 0 {
			cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, floor+1
		}
	default:
		return nil, fmt.Errorf("natsjs: source %s: consumer %s: %w", s.cfg.Stream, s.cfg.Durable, err)
	}
	cons, err := retry.Do(ctx, s.pol, retry.OpConsumerCreate, s.consumerName(), func(ctx context.Context) (jetstream.Consumer, error) {
		return s.js.CreateOrUpdateConsumer(ctx, s.cfg.Stream, cfg)
	})
	if err != nil {
		return nil, fmt.Errorf("natsjs: source %s: consumer %s: %w", s.cfg.Stream, s.cfg.Durable, err)
	}
	if s.cfg.Ordering == Ordered {
		// (An unordered source never resets, and may run where the reset
		// API is missing or not permitted.)
		if err := s.checkStart(ctx, cons, cfg); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	s.cons, s.conflict = cons, nil
	s.mu.Unlock()
	return cons, nil
}

// checkStart makes a durable just created to start after a floor (cfg:
// DeliverByStartSequence) acknowledged up to that floor. Created within
// moments of the deletion of its predecessor, the server can report the
// new durable's ack floor as 0 although it starts at OptStartSeq, and a
// reset to the ack floor (every ordered takeover's first step) would then
// deliver the stream from its first message again. A reset to OptStartSeq
// sets the floor right.
func (s *Source) checkStart(ctx context.Context, cons jetstream.Consumer, cfg jetstream.ConsumerConfig) error {
	ci := cons.CachedInfo()
	if ci == nil || !belowStart(&ci.Config, ci.AckFloor.Stream+1) {
		return nil
	}
	s.log.Warn("nats consumer created with an ack floor below its start; resetting it to its start",
		"ackFloorStreamSeq", ci.AckFloor.Stream, "startSeq", cfg.OptStartSeq)
	_, err := retry.Do(ctx, s.pol, retry.OpConsumerReset, s.consumerName()+" (start)",
		func(ctx context.Context) (*jetstream.ConsumerResetResponse, error) {
			return s.js.ResetConsumerToSequence(ctx, s.cfg.Stream, s.cfg.Durable, cfg.OptStartSeq)
		})
	if err != nil {
		return fmt.Errorf("natsjs: source %s: consumer %s: reset to its start %d: %w", s.cfg.Stream, s.cfg.Durable, cfg.OptStartSeq, err)
	}
	return nil
}

// belowStart reports whether next, the stream sequence a durable would
// deliver from after its ack floor, is below where the durable c starts:
// never so for a healthy durable, the server's mistake after a quick
// re-creation (checkStart).
func belowStart(c *jetstream.ConsumerConfig, next uint64) bool {
	return c.DeliverPolicy == jetstream.DeliverByStartSequencePolicy && next < c.OptStartSeq
}

// deleteConsumer deletes the durable (one that is already gone is fine).
func (s *Source) deleteConsumer(ctx context.Context) error {
	_, err := retry.Do(ctx, s.pol, retry.OpConsumerDelete, s.consumerName(), func(ctx context.Context) (struct{}, error) {
		err := s.js.DeleteConsumer(ctx, s.cfg.Stream, s.cfg.Durable)
		if errors.Is(err, jetstream.ErrConsumerNotFound) {
			err = nil
		}
		return struct{}{}, err
	})
	if err != nil {
		return fmt.Errorf("natsjs: source %s: delete consumer %s to change its ack policy: %w", s.cfg.Stream, s.cfg.Durable, err)
	}
	return nil
}

// waiting reports whether the durable was last found in the other mode and
// in use.
func (s *Source) waiting() bool {
	s.mu.Lock()
	me := s.conflict
	s.mu.Unlock()
	if me != nil {
		s.setState(transition{to: StateWaiting, reason: me.Have})
	}
	return me != nil
}

// waitMode waits one BacklogInterval while the durable is in the other
// ordering mode and in use, warning once a minute (lastWarn), and checks it
// again; it reports true once the durable is (or was switched to) this
// source's mode.
func (s *Source) waitMode(ctx context.Context, lastWarn *time.Time) bool {
	if time.Since(*lastWarn) >= time.Minute {
		*lastWarn = time.Now()
		s.mu.Lock()
		me := s.conflict
		s.mu.Unlock()
		if me != nil {
			s.log.Warn("nats source waiting: consumer in use in another mode or by another rule", "err", me)
		}
	}
	if !sleepCtx(ctx, s.cfg.BacklogInterval) {
		return false
	}
	_, err := s.ensureConsumer(ctx, s.ackFloor.Load())
	if err != nil && !s.waiting() {
		s.log.Warn("nats consumer check failed while waiting", "err", err)
	}
	return err == nil
}

// consumerName is "<stream>/<durable>", as requests name the consumer in
// logs.
func (s *Source) consumerName() string { return s.cfg.Stream + "/" + s.cfg.Durable }

// transient tells API failures worth another attempt (no answer, no
// responders, an election, the link down): retry.Transient, the one
// classification of every broker request.
func transient(err error) bool { return retry.Transient(err) }
