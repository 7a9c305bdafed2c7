package router

import (
	"fmt"
	"strings"
)

const (
	kindNATS     = "a NATS subject"
	kindRocketMQ = "a RocketMQ topic"
)

// brokerUse remembers how a broker name was first used: a broker is either
// NATS (subjects) or RocketMQ (topics), never both.
type brokerUse struct {
	kind  string
	where string
}

type ruleChecker struct {
	t       *Table
	names   map[string]string
	brokers map[string]brokerUse
	// streams records, per NATS broker and stream, the first rule reading
	// it, to check that every rule of a partitioned stream agrees on the
	// stream's one subject transform.
	streams map[[2]string]streamUse
	// groups records the first rule of each consumer group: per NATS
	// broker and stream (a durable), per RocketMQ broker (a group).
	groups map[[3]string]string
}

// streamUse is how the first rule of a NATS stream reads it.
type streamUse struct {
	rule, where string
	subject     string
	partitions  int
	wildcard    int // KeyWildcard of the key token; 0 when not partitioned
}

func validateRules(t *Table, rules []parsedRule) {
	c := &ruleChecker{t: t, names: map[string]string{}, brokers: map[string]brokerUse{}, streams: map[[2]string]streamUse{},
		groups: map[[3]string]string{}}
	for i := range rules {
		c.check(rules[i].doc, &rules[i].tr)
	}
}

func (c *ruleChecker) useBroker(d *doc, path, broker, kind string) {
	where := fmt.Sprintf("%s:%d (%s)", d.file, d.lineOf(path), path)
	if u, ok := c.brokers[broker]; ok && u.kind != kind {
		d.errorf(path, "broker %q is used for %s here but for %s at %s; a broker is either NATS or RocketMQ",
			broker, kind, u.kind, u.where)
		return
	}
	if _, ok := c.brokers[broker]; !ok {
		c.brokers[broker] = brokerUse{kind: kind, where: where}
	}
}

func (c *ruleChecker) check(d *doc, r *topicRuleDoc) {
	switch {
	case r.Name == "":
		d.errorf("name", "missing: the topic rule's name")
	case !reName.MatchString(r.Name):
		d.errorf("name", "%q is not a valid name (letters, digits, '_' and '-', at most 64)", r.Name)
	default:
		where := fmt.Sprintf("%s:%d", d.file, d.lineOf("name"))
		if first, dup := c.names[r.Name]; dup {
			d.errorf("name", "duplicate topic rule %q (first at %s)", r.Name, first)
		} else {
			c.names[r.Name] = where
		}
	}
	sourceNATS := c.checkSource(d, r)
	c.checkKey(d, r, sourceNATS)
	c.checkOrdering(d, r, sourceNATS)
	broadcast := d.present("target.cells")
	selected := c.allCells()
	if broadcast {
		selected = c.checkBroadcast(d, r)
	} else {
		c.checkShard(d, r)
		if d.present("target.excludeOrigin") {
			d.errorf("target.excludeOrigin", "applies to broadcast targets only (with target.cells)")
		}
	}

	onMissing := r.OnMissingKey
	switch onMissing {
	case "", OnMissingKeyDLQ:
		if r.DLQ == nil {
			if d.present("onMissingKey") {
				d.errorf("dlq", "missing: required when onMissingKey is dlq")
			} else {
				d.errorf("dlq", "missing: required when onMissingKey is dlq (the default; or set onMissingKey: global)")
			}
		}
	case OnMissingKeyGlobal:
		if broadcast {
			d.errorf("onMissingKey", "global does not apply to a broadcast rule (target.cells): events without a key go to the dlq")
		} else if c.t.globalIdx < 0 && c.t.cm != nil {
			// Checked on the compiled global cell, not on the field: a
			// global that is empty or names no cell gives none either.
			if c.t.cm.present("global") {
				d.errorf("onMissingKey", "global needs a global cell, but the CellMap's global (%s:%d) names none", c.t.cm.file, c.t.cm.lineOf("global"))
			} else {
				d.errorf("onMissingKey", "global needs a global cell, but the CellMap names none")
			}
		}
	default:
		d.errorf("onMissingKey", "unknown value %q: must be %s or %s", onMissing, OnMissingKeyDLQ, OnMissingKeyGlobal)
	}

	if !d.present("target") {
		d.errorf("target", "missing: where events go, e.g. {broker: nats, subject: \"cell.{cell}.%s\"}", r.Name)
	} else if t := c.checkTarget(d, "target", r.Target, true, r.Name); t != nil {
		for _, f := range []struct {
			path string
			t    tmpl
		}{{"target.broker", t.broker}, {"target.subject", t.subject}, {"target.topic", t.topic}} {
			switch {
			case !f.t.has(phShard):
			case broadcast:
				d.errorf(f.path, "{shard} cannot be rendered for a broadcast rule (target.cells): it computes no shard")
			case onMissing == OnMissingKeyGlobal:
				d.errorf(f.path, "{shard} cannot be rendered for events without a key (onMissingKey: global)")
			}
		}
		if broadcast && !t.subject.has(phShard) && !t.topic.has(phShard) && !t.broker.has(phShard) {
			c.checkDistinct(d, r, t, selected)
		}
		if sourceNATS && t.subject != nil && checkSubject(r.Source.Subject, true) == nil {
			c.checkLoop(d, "target.subject", r, t, selected)
		}
	}
	if r.DLQ != nil {
		for _, f := range []string{"dlq.cells", "dlq.excludeOrigin"} {
			if d.present(f) {
				d.errorf(f, "only a target broadcasts; a dead letter goes to one place")
			}
		}
		if t := c.checkTarget(d, "dlq", *r.DLQ, false, r.Name); t != nil && sourceNATS && t.subject != nil &&
			checkSubject(r.Source.Subject, true) == nil {
			subj := t.subject.render("", "", r.Name)
			if t.broker.render("", "", r.Name) == r.Source.Broker &&
				subjectMatches(r.Source.Subject, strings.Split(subj, "."), func(a, b string) bool { return a == b }) {
				d.errorf("dlq.subject", "%q is matched by the source subject filter %q: dead letters would be consumed again (routing loop)",
					subj, r.Source.Subject)
			}
		}
	}
}

// checkSource validates the source and reports whether it is NATS.
func (c *ruleChecker) checkSource(d *doc, r *topicRuleDoc) bool {
	s := r.Source
	if !d.present("source") {
		d.errorf("source", "missing: e.g. {broker: nats, stream: ORDERS, subject: \"orders.>\"}")
		return false
	}
	if s.Broker == "" {
		d.errorf("source.broker", "missing: the broker name from the bridge config")
	} else if !reBroker.MatchString(s.Broker) {
		d.errorf("source.broker", "%q is not a valid broker name (letters, digits, '_' and '-')", s.Broker)
	}
	if s.Group != "" && !reName.MatchString(s.Group) {
		d.errorf("source.group", "%q is not a valid consumer group name (letters, digits, '_' and '-', at most 64)", s.Group)
	}
	isNATS := s.Stream != "" || s.Subject != ""
	isRMQ := s.Topic != "" || s.Tags != ""
	switch {
	case isNATS && isRMQ:
		d.errorf("source", "has NATS fields (stream, subject) and RocketMQ fields (topic, tags); a source is one or the other")
		return false
	case !isNATS && !isRMQ:
		d.errorf("source", "needs stream and subject (NATS JetStream) or topic (RocketMQ)")
		return false
	case isNATS:
		if s.Stream == "" {
			d.errorf("source.stream", "missing: the JetStream stream to consume")
		} else if !reBroker.MatchString(s.Stream) {
			d.errorf("source.stream", "%q is not a valid stream name (letters, digits, '_' and '-')", s.Stream)
		}
		if s.Subject == "" {
			d.errorf("source.subject", "missing: the subject filter of the consumer, e.g. \"orders.>\"")
		} else if err := checkSubject(s.Subject, true); err != nil {
			d.errorf("source.subject", "%v", err)
		}
		if s.Broker != "" {
			c.useBroker(d, "source.broker", s.Broker, kindNATS)
		}
	default:
		if s.Topic == "" {
			d.errorf("source.topic", "missing: the RocketMQ topic to consume")
		} else if !reRMQTopic.MatchString(s.Topic) {
			d.errorf("source.topic", "%q is not a valid RocketMQ topic (letters, digits, '%%', '|', '_' and '-', at most 127)", s.Topic)
		}
		if d.present("source.tags") && strings.TrimSpace(s.Tags) == "" {
			d.errorf("source.tags", "empty: omit it or give a tag expression such as \"TagA || TagB\"")
		}
		if s.Broker != "" {
			c.useBroker(d, "source.broker", s.Broker, kindRocketMQ)
		}
	}
	c.checkGroup(d, r, isNATS)
	return isNATS
}

// checkGroup refuses a consumer group that another rule already reads
// with: on NATS one durable per stream and group, on RocketMQ one group
// per broker whose members must all subscribe alike. Two rules on one
// durable or group take each other's messages (and rewrite its filter).
func (c *ruleChecker) checkGroup(d *doc, r *topicRuleDoc, isNATS bool) {
	s := r.Source
	group := s.Group
	if group == "" {
		group = "cellbridge-" + r.Name
	}
	key := [3]string{s.Broker, "", group}
	on := "broker " + s.Broker
	if isNATS {
		key[1] = s.Stream
		on = "stream " + s.Stream
	}
	where := fmt.Sprintf("rule %s (%s:%d)", r.Name, d.file, d.lineOf("source"))
	if first, ok := c.groups[key]; ok {
		field := "source.group"
		if !d.present(field) {
			field = "source"
		}
		d.errorf(field, "consumer group %q on %s is already used by %s: two rules cannot share a consumer group (each would take the other's messages); give each rule its own source.group", group, on, first)
		return
	}
	c.groups[key] = where
}

func (c *ruleChecker) checkKey(d *doc, r *topicRuleDoc, sourceNATS bool) {
	if !d.present("key") {
		d.errorf("key", "missing: one of header, json, subjectToken, rocketmqKeys")
		return
	}
	var set []string
	for _, f := range []string{"header", "json", "subjectToken", "rocketmqKeys"} {
		if d.present("key." + f) {
			set = append(set, f)
		}
	}
	switch {
	case len(set) == 0:
		d.errorf("key", "needs exactly one of header, json, subjectToken, rocketmqKeys")
		return
	case len(set) > 1:
		d.errorf("key", "conflicting key sources %s: exactly one of header, json, subjectToken, rocketmqKeys", strings.Join(set, ", "))
		return
	}
	k := r.Key
	switch set[0] {
	case "header":
		if !reHeaderName.MatchString(k.Header) {
			d.errorf("key.header", "%q is not a valid header name", k.Header)
		}
	case "json":
		if !reJSONPath.MatchString(k.JSON) {
			d.errorf("key.json", "%q is not a dotted path such as user.id or items.0.uid", k.JSON)
		}
	case "subjectToken":
		if k.SubjectToken == 0 {
			d.errorf("key.subjectToken", "must be a token position: 1 is the first token, -1 the last")
		}
	case "rocketmqKeys":
		if !k.RocketMQKeys {
			d.errorf("key.rocketmqKeys", "must be true when given")
		} else if sourceNATS {
			d.errorf("key.rocketmqKeys", "needs a RocketMQ source (NATS messages have no keys)")
		}
	}
}

// checkOrdering validates source.ordering and source.partitions, and that
// the rules of one partitioned stream agree on its subject transform.
func (c *ruleChecker) checkOrdering(d *doc, r *topicRuleDoc, sourceNATS bool) {
	s := r.Source
	switch {
	case !d.present("source.ordering"):
	case !sourceNATS && (s.Topic != "" || s.Tags != ""):
		d.errorf("source.ordering", "applies to NATS sources only (a RocketMQ consumer group gives each queue to one consumer)")
	case s.Ordering != OrderingOrdered && s.Ordering != OrderingNone:
		d.errorf("source.ordering", "unknown value %q: must be %s or %s", s.Ordering, OrderingOrdered, OrderingNone)
	}
	switch {
	case !d.present("source.acks"):
	case !sourceNATS && (s.Topic != "" || s.Tags != ""):
		d.errorf("source.acks", "applies to NATS sources only (a RocketMQ consumer commits offsets per queue)")
	case s.Acks != AcksEach && s.Acks != AcksCumulative:
		d.errorf("source.acks", "unknown value %q: must be %s or %s", s.Acks, AcksEach, AcksCumulative)
	case s.Acks == AcksCumulative && s.Ordering == OrderingNone:
		d.errorf("source.acks", "cumulative needs ordering: ordered (replicas sharing a durable with ordering: none each acknowledge their own messages); remove one of them")
	case s.Acks == AcksCumulative && r.DLQ == nil:
		d.errorf("source.acks", "cumulative needs a dlq: a message that can go nowhere else (too large, too many hops) would be held for ever, the ack floor could not pass it, and the rule would stop after MaxAckPending more messages; add a dlq or use acks: each")
	}
	if !d.present("source.partitions") || s.Partitions == 0 {
		c.useStream(d, r, sourceNATS, 0)
		return
	}
	switch {
	case s.Partitions < 0 || s.Partitions > MaxPartitions:
		d.errorf("source.partitions", "must be between 1 and %d, not %d (0 or absent: not partitioned)", MaxPartitions, s.Partitions)
		return
	case !sourceNATS:
		if s.Topic != "" || s.Tags != "" {
			d.errorf("source.partitions", "applies to NATS sources only (a RocketMQ topic is partitioned into queues by the broker)")
		}
		return
	case s.Ordering == OrderingNone:
		d.errorf("source.partitions", "cannot be combined with ordering: none (partitions exist to keep per-key order across replicas); remove one of them")
		return
	case !d.present("key.subjectToken") || d.present("key.header") || d.present("key.json") || d.present("key.rocketmqKeys"):
		d.errorf("source.partitions", "needs key: {subjectToken: N}: the stream partitions events by a subject token, so the key must be that token")
		return
	case r.Key.SubjectToken == 0 || checkSubject(s.Subject, true) != nil:
		return // reported at key.subjectToken or source.subject
	}
	w, err := KeyWildcard(s.Subject, r.Key.SubjectToken)
	if err != nil {
		d.errorf("key.subjectToken", "with source.partitions: %v", err)
		return
	}
	c.useStream(d, r, true, w)
}

// useStream records how rule r reads its NATS stream and reports a rule
// that reads a partitioned stream differently from the first rule that
// read it: a stream holds one subject transform, which rewrites the
// subjects every reader sees.
func (c *ruleChecker) useStream(d *doc, r *topicRuleDoc, sourceNATS bool, wildcard int) {
	s := r.Source
	if !sourceNATS || s.Stream == "" || s.Broker == "" {
		return
	}
	parts := s.Partitions
	if wildcard == 0 {
		parts = 0
	}
	key := [2]string{s.Broker, s.Stream}
	u := streamUse{rule: r.Name, where: fmt.Sprintf("%s:%d", d.file, d.lineOf("source")), subject: s.Subject, partitions: parts, wildcard: wildcard}
	first, ok := c.streams[key]
	if !ok {
		c.streams[key] = u
		return
	}
	if first.partitions == 0 && parts == 0 {
		return
	}
	if first.partitions != parts || first.wildcard != wildcard || first.subject != s.Subject {
		d.errorf("source.stream", "stream %s is read by rule %s (%s) with %s, and here with %s: every rule of a partitioned stream must use the same subject, partitions and key token (the stream holds one subject transform, which rewrites the subjects every reader sees)",
			s.Stream, first.rule, first.where, first.describe(), u.describe())
	}
}

func (u streamUse) describe() string {
	if u.partitions == 0 {
		return fmt.Sprintf("subject %q, not partitioned", u.subject)
	}
	return fmt.Sprintf("subject %q, %d partitions on wildcard %d", u.subject, u.partitions, u.wildcard)
}

func (c *ruleChecker) checkShard(d *doc, r *topicRuleDoc) {
	if !d.present("shard") {
		d.errorf("shard", "missing: e.g. {func: digits, from: -3, to: -1}, {func: mod} or {func: fnv1a}")
		return
	}
	f := r.Shard
	switch f.Func {
	case "":
		d.errorf("shard.func", "missing: digits, mod or fnv1a")
	case ShardMod, ShardFNV1a:
		for _, p := range []string{"shard.from", "shard.to"} {
			if d.present(p) {
				d.errorf(p, "only applies to func: digits")
			}
		}
	case ShardDigits:
		if !d.present("shard.from") {
			d.errorf("shard.from", "missing: digits needs from (and to), e.g. from: -3, to: -1")
			return
		}
		toSet := d.present("shard.to")
		var width int
		switch {
		case f.From >= 0 && !toSet:
			d.errorf("shard.to", "missing: required when from is not negative")
			return
		case f.From >= 0 && f.To <= f.From:
			d.errorf("shard.to", "must be greater than from (%d)", f.From)
			return
		case f.From < 0 && toSet && f.To >= 0:
			d.errorf("shard.to", "must be negative like from (counted from the end of the key), or omitted for the end of the key")
			return
		case f.From < 0 && toSet && f.To <= f.From:
			d.errorf("shard.to", "must be greater than from (%d)", f.From)
			return
		case f.From < 0 && !toSet:
			width = -f.From
		default:
			width = f.To - f.From
		}
		if width > 9 {
			d.errorf("shard.from", "digits takes at most 9 characters, not %d", width)
			return
		}
		if c.t.shards > 0 && pow10(width) < c.t.shards {
			d.errorf("shard.from", "%d digits give %d values, fewer than the %d shards", width, pow10(width), c.t.shards)
		}
	default:
		d.errorf("shard.func", "unknown function %q: must be digits, mod or fnv1a", f.Func)
	}
}

func pow10(n int) int {
	p := 1
	for range n {
		p *= 10
	}
	return p
}

type targetTmpl struct{ broker, subject, topic tmpl }

// checkTarget validates a target (full: {cell} and {shard} allowed, as in
// `target`; otherwise only {topic}, as in `dlq`) and returns its parsed
// templates, or nil when it is invalid.
func (c *ruleChecker) checkTarget(d *doc, path string, td targetDoc, full bool, topic string) *targetTmpl {
	var out targetTmpl
	ok := true
	parse := func(field, s string) tmpl {
		t, err := parseTemplate(s)
		if err != nil {
			d.errorf(path+"."+field, "%v", err)
			ok = false
			return nil
		}
		if !full && (t.has(phCell) || t.has(phShard)) {
			d.errorf(path+"."+field, "only {topic} may be used here ({cell} and {shard} are unknown for dead letters)")
			ok = false
		}
		return t
	}
	if td.Broker == "" {
		d.errorf(path+".broker", "missing: the broker name from the bridge config")
		ok = false
	} else {
		out.broker = parse("broker", td.Broker)
	}
	switch {
	case td.Subject != "" && td.Topic != "":
		d.errorf(path, "has both subject (NATS) and topic (RocketMQ); give one")
		return nil
	case td.Subject == "" && td.Topic == "":
		d.errorf(path, "needs subject (NATS) or topic (RocketMQ)")
		return nil
	case td.Subject != "":
		out.subject = parse("subject", td.Subject)
	default:
		out.topic = parse("topic", td.Topic)
	}
	if !ok {
		return nil
	}
	// Render for every cell so that a cell name cannot make a target invalid.
	cells := []string{""}
	if full {
		cells[0] = "cell" // a stand-in when the CellMap is missing or has no valid cell
	}
	if full && len(c.t.cells) > 0 {
		cells = cells[:0]
		for _, cl := range c.t.cells {
			cells = append(cells, cl.Name)
		}
	}
	shards := max(c.t.shards, 1)
	kind := kindNATS
	if out.topic != nil {
		kind = kindRocketMQ
	}
	seen := map[string]bool{}
	for _, cell := range cells {
		sh := shardText(0, shards)
		b := out.broker.render(cell, sh, topic)
		if !reBroker.MatchString(b) {
			d.errorf(path+".broker", "renders to %q, not a valid broker name (letters, digits, '_' and '-')", b)
			return nil
		}
		if !seen[b] {
			seen[b] = true
			c.useBroker(d, path+".broker", b, kind)
		}
		if out.subject != nil {
			if err := checkSubject(out.subject.render(cell, sh, topic), false); err != nil {
				d.errorf(path+".subject", "%v", err)
				return nil
			}
		} else if tp := out.topic.render(cell, sh, topic); !reRMQTopic.MatchString(tp) {
			d.errorf(path+".topic", "renders to %q, not a valid RocketMQ topic (letters, digits, '%%', '|', '_' and '-', at most 127)", tp)
			return nil
		}
	}
	return &out
}

// checkLoop reports a target subject that the rule's own source filter would
// consume again, for any of the cells the rule publishes to.
func (c *ruleChecker) checkLoop(d *doc, path string, r *topicRuleDoc, t *targetTmpl, cells []Cell) {
	for _, cl := range cells {
		if t.broker.render(cl.Name, "0", r.Name) != r.Source.Broker {
			continue
		}
		if templateLoops(r.Source.Subject, t.subject, cl.Name, r.Name, max(c.t.shards, 1)) {
			d.errorf(path, "%q for cell %s is matched by the source subject filter %q on the same broker: forwarded events would be consumed again (routing loop)",
				r.Target.Subject, cl.Name, r.Source.Subject)
			return
		}
	}
}
