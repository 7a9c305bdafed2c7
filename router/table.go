package router

import (
	"fmt"
	"sort"
)

// Cell is one cell of the CellMap.
type Cell struct {
	Name     string
	City     string  // informational
	State    string  // StateActive or StateDown
	Failover string  // "" when none
	Shards   []Range // owned shard ranges, ascending
}

// Pin routes one exact key to a cell (grey routing).
type Pin struct {
	Key  string
	Cell string
}

// Source is where a topic rule's events come from: a NATS JetStream stream
// and subject filter, or a RocketMQ topic with optional tags.
type Source struct {
	Broker  string // broker name in the bridge config
	Stream  string // NATS: JetStream stream
	Subject string // NATS: subject filter of the consumer (wildcards allowed)
	Group   string // durable consumer / consumer group name; defaults to "cellbridge-<rule>"
	Topic   string // RocketMQ: topic
	Tags    string // RocketMQ: tag expression; "" = all
	// Partitions is the number of stream partitions (NATS only; 0 = not
	// partitioned). A partitioned rule's key is a subject token whose
	// source-subject token is a '*' (KeyWildcard), and the stream carries
	// the subject transform that prefixes every subject with its partition.
	Partitions int
	// Ordering is OrderingOrdered (the default) or OrderingNone for NATS
	// sources, "" for RocketMQ sources (a RocketMQ consumer group gives
	// each queue to one consumer on its own).
	Ordering string
	// Acks is AcksEach (the default) or AcksCumulative for ordered NATS
	// sources, "" for the others.
	Acks string
}

// IsNATS reports whether the source is a NATS JetStream stream (else RocketMQ).
func (s Source) IsNATS() bool { return s.Stream != "" }

// KeySource says where the shard key is read from; exactly one field is set.
type KeySource struct {
	Header       string // header / user property name
	JSON         string // dotted path into a JSON body
	SubjectToken int    // 1-based token of the subject; negative counts from the end
	RocketMQKeys bool   // the first of the RocketMQ message keys
}

// String describes the key source, e.g. "header X-User-Id".
func (k KeySource) String() string {
	switch {
	case k.Header != "":
		return "header " + k.Header
	case k.JSON != "":
		return "json field " + k.JSON
	case k.SubjectToken != 0:
		return fmt.Sprintf("subject token %d", k.SubjectToken)
	default:
		return "RocketMQ keys"
	}
}

// ShardFunc computes a shard number from a key.
type ShardFunc struct {
	Func string // ShardDigits, ShardMod or ShardFNV1a
	// From and To select the characters [From:To) for digits; negative values
	// count from the end of the key; To == 0 with a negative From means the
	// end of the key.
	From, To int
}

// TargetTemplate is a destination with {cell}, {shard} and {topic}
// placeholders, as written in the rule file.
type TargetTemplate struct {
	Broker  string
	Subject string // NATS
	Topic   string // RocketMQ
}

// Rule is a compiled topic rule. It is read-only and shared by every user of
// its Table.
type Rule struct {
	Name         string
	Description  string
	Source       Source
	Key          KeySource
	Shard        ShardFunc
	Target       TargetTemplate
	DLQ          *Target // nil when none
	OnMissingKey string  // OnMissingKeyDLQ or OnMissingKeyGlobal
	File         string  // where the rule was defined
	Line         int
	// Broadcast is the cell selection of a broadcast rule (target.cells):
	// every event goes to every selected cell that is not down. nil for a
	// rule routed by shard.
	Broadcast *CellSelector
	// ExcludeOrigin (broadcast rules only): no copy goes to the cell named
	// by an event's Cell-Origin header.
	ExcludeOrigin bool

	t            *Table
	cellTargets  []Target // per cell index: the rendered target (targets without {shard})
	byShard      []Target // per shard, only for targets with {shard}: the serving cell's target
	pinTargets   []Target // per pin of the table
	pinned       []bool   // per shard, only when there are pins: a pinned key falls into it
	globalTarget Target
	missing      Decision        // template for an empty key
	bcast        []BroadcastCell // broadcast rules: the selected cells in CellMap order
	bcastExplain string
}

// Render returns the rule's target for cell and shard (shard < 0 renders
// {shard} as ""). It allocates; the hot path uses precomputed targets.
func (r *Rule) Render(cell string, shard int) Target {
	sh := ""
	if shard >= 0 {
		sh = shardText(shard, r.t.shards)
	}
	return renderTarget(r.Target, cell, sh, r.Name)
}

func renderTarget(tt TargetTemplate, cell, shard, topic string) Target {
	var out Target
	for _, f := range []struct {
		src string
		dst *string
	}{{tt.Broker, &out.Broker}, {tt.Subject, &out.Subject}, {tt.Topic, &out.Topic}} {
		if f.src == "" {
			continue
		}
		t, err := parseTemplate(f.src)
		if err != nil { // validated on load; unreachable for compiled rules
			*f.dst = f.src
			continue
		}
		*f.dst = t.render(cell, shard, topic)
	}
	return out
}

// shardRoute is the table's precomputed answer for one shard.
type shardRoute struct {
	cellIdx int32  // index of cell
	cell    string // the cell serving the shard (owner, or its failover when down)
	reason  Reason // owner, failover or held
	explain string
}

// Table is a compiled, validated rule set. It is immutable after Load and
// safe for concurrent use.
type Table struct {
	version   int64
	shards    int
	global    string
	globalIdx int
	cells     []Cell
	cellIdx   map[string]int
	cellPath  []string // field path of each cell in the CellMap (validation)
	owner     []int32  // shard → owning cell index
	blocked   []bool   // shard → blocked
	pins      map[string]int
	pinList   []Pin
	pinCell   []int32
	route     []shardRoute
	pinRoute  []shardRoute
	rules     []*Rule
	byName    map[string]*Rule

	cm          *doc // the CellMap document (validation only)
	fingerprint string
	dir         string
	files       []string
}

// Version returns the rules version.
func (t *Table) Version() int64 { return t.version }

// Shards returns the size of the shard space [0, Shards()).
func (t *Table) Shards() int { return t.shards }

// Global returns the global cell, or "".
func (t *Table) Global() string { return t.global }

// Cells returns a copy of the cells in the order of the rule file.
func (t *Table) Cells() []Cell {
	out := make([]Cell, len(t.cells))
	for i, c := range t.cells {
		c.Shards = append([]Range(nil), c.Shards...)
		out[i] = c
	}
	return out
}

// Cell returns the named cell.
func (t *Table) Cell(name string) (Cell, bool) {
	i, ok := t.cellIdx[name]
	if !ok {
		return Cell{}, false
	}
	c := t.cells[i]
	c.Shards = append([]Range(nil), c.Shards...)
	return c, true
}

// Pins returns a copy of the pins in file order.
func (t *Table) Pins() []Pin { return append([]Pin(nil), t.pinList...) }

// Blocked returns the blocked shards as ascending ranges.
func (t *Table) Blocked() []Range { return runs(t.shards, func(s int) bool { return t.blocked[s] }) }

// IsBlocked reports whether shard is blocked (false when out of range).
func (t *Table) IsBlocked(shard int) bool { return shard >= 0 && shard < t.shards && t.blocked[shard] }

// Owner returns the cell that owns shard in the CellMap, or "" when shard is
// out of range.
func (t *Table) Owner(shard int) string {
	if shard < 0 || shard >= t.shards {
		return ""
	}
	return t.cells[t.owner[shard]].Name
}

// Serving returns the cell that receives shard's events when it is not
// blocked: the owner, or its failover cell when the owner is down.
func (t *Table) Serving(shard int) string {
	if shard < 0 || shard >= t.shards {
		return ""
	}
	return t.route[shard].cell
}

// Rules returns the topic rules sorted by name.
func (t *Table) Rules() []*Rule { return append([]*Rule(nil), t.rules...) }

// Rule returns the named topic rule, or nil.
func (t *Table) Rule(name string) *Rule {
	// A handful of rules is the norm: comparing names (length first) beats
	// hashing the name.
	if len(t.rules) <= 8 {
		for _, r := range t.rules {
			if r.Name == name {
				return r
			}
		}
		return nil
	}
	return t.byName[name]
}

// Fingerprint identifies the rule files' content (SHA-256 over names and
// bytes): equal fingerprints mean identical files.
func (t *Table) Fingerprint() string { return t.fingerprint }

// Dir returns the directory the table was loaded from.
func (t *Table) Dir() string { return t.dir }

// Files returns the rule files the table was loaded from.
func (t *Table) Files() []string { return append([]string(nil), t.files...) }

// effective returns the index of the cell serving for cell i.
func (t *Table) effective(i int32) int32 {
	if t.cells[i].State == StateDown {
		return int32(t.cellIdx[t.cells[i].Failover])
	}
	return i
}

// compile precomputes every decision so that Resolve neither formats nor
// allocates. It runs only on a validated table.
func (t *Table) compile(rules []parsedRule) {
	t.route = make([]shardRoute, t.shards)
	for s := range t.route {
		o := t.owner[s]
		e := t.effective(o)
		r := &t.route[s]
		r.cellIdx, r.cell = e, t.cells[e].Name
		switch {
		case t.blocked[s]:
			r.reason = ReasonHeld
			r.explain = fmt.Sprintf("shard %d is blocked (a cell switch is in progress; current owner %s): hold and retry", s, r.cell)
		case e != o:
			r.reason = ReasonFailover
			r.explain = fmt.Sprintf("shard %d: owner %s is down, failover to %s", s, t.cells[o].Name, r.cell)
		default:
			r.reason = ReasonOwner
			r.explain = fmt.Sprintf("shard %d is owned by %s", s, r.cell)
		}
	}
	t.pinRoute = make([]shardRoute, len(t.pinList))
	for i, p := range t.pinList {
		e := t.effective(t.pinCell[i])
		r := &t.pinRoute[i]
		r.cellIdx, r.cell = e, t.cells[e].Name
		if e != t.pinCell[i] {
			r.reason = ReasonFailover
			r.explain = fmt.Sprintf("key pinned to %s, which is down: failover to %s", p.Cell, r.cell)
		} else {
			r.reason = ReasonPin
			r.explain = "key pinned to " + p.Cell
		}
	}

	t.byName = make(map[string]*Rule, len(rules))
	for _, pr := range rules {
		r := compileRule(t, pr)
		t.rules = append(t.rules, r)
		t.byName[r.Name] = r
	}
	sort.Slice(t.rules, func(i, j int) bool { return t.rules[i].Name < t.rules[j].Name })
}

func compileRule(t *Table, pr parsedRule) *Rule {
	d := pr.tr
	r := &Rule{
		Name:        d.Name,
		Description: d.Description,
		Source: Source{Broker: d.Source.Broker, Stream: d.Source.Stream, Subject: d.Source.Subject,
			Group: d.Source.Group, Topic: d.Source.Topic, Tags: d.Source.Tags,
			Partitions: d.Source.Partitions, Ordering: d.Source.Ordering, Acks: d.Source.Acks},
		Key:          KeySource{Header: d.Key.Header, JSON: d.Key.JSON, SubjectToken: d.Key.SubjectToken, RocketMQKeys: d.Key.RocketMQKeys},
		Shard:        ShardFunc{Func: d.Shard.Func, From: d.Shard.From, To: d.Shard.To},
		Target:       TargetTemplate{Broker: d.Target.Broker, Subject: d.Target.Subject, Topic: d.Target.Topic},
		OnMissingKey: d.OnMissingKey,
		File:         pr.doc.file,
		Line:         pr.doc.line,
		t:            t,
	}
	if r.Source.Group == "" {
		r.Source.Group = "cellbridge-" + r.Name
	}
	if r.OnMissingKey == "" {
		r.OnMissingKey = OnMissingKeyDLQ
	}
	if r.Source.Ordering == "" && r.Source.IsNATS() {
		r.Source.Ordering = OrderingOrdered
	}
	if r.Source.Acks == "" && r.Source.Ordering == OrderingOrdered {
		r.Source.Acks = AcksEach
	}
	if d.DLQ != nil {
		dlq := renderTarget(TargetTemplate{Broker: d.DLQ.Broker, Subject: d.DLQ.Subject, Topic: d.DLQ.Topic}, "", "", r.Name)
		r.DLQ = &dlq
	}

	perShard := false
	for _, s := range []string{r.Target.Broker, r.Target.Subject, r.Target.Topic} {
		if tp, _ := parseTemplate(s); tp.has(phShard) {
			perShard = true
		}
	}
	// One rendered target per cell, shared by every shard of the cell unless
	// the target names {shard}; then one per shard.
	r.cellTargets = make([]Target, len(t.cells))
	for i, c := range t.cells {
		r.cellTargets[i] = renderTarget(r.Target, c.Name, "", r.Name)
	}
	if d.Target.Cells != nil {
		// Validated: a broadcast rule renders no {shard}, has no shard
		// function, and pins and blocked shards do not apply to it.
		r.Broadcast = selectorOf(d.Target.Cells)
		r.ExcludeOrigin = d.Target.ExcludeOrigin
		r.compileBroadcast(t)
		r.missing = Decision{Topic: r.Name, Shard: -1, Version: t.version, Cause: CauseMissingKey, Reason: ReasonDLQ,
			Target: *r.DLQ, Explain: fmt.Sprintf("no key: empty key from %s: dead-letter", r.Key)}
		return r
	}
	if perShard {
		r.byShard = make([]Target, t.shards)
		for s := range r.byShard {
			if t.route[s].reason != ReasonHeld {
				r.byShard[s] = renderTarget(r.Target, t.route[s].cell, shardText(s, t.shards), r.Name)
			}
		}
	}
	r.pinTargets = make([]Target, len(t.pinList))
	if len(t.pinList) > 0 {
		r.pinned = make([]bool, t.shards)
	}
	for i, p := range t.pinList {
		s, _, _ := r.shardOf(p.Key)
		if s < 0 {
			continue // this rule cannot produce the pinned key
		}
		r.pinned[s] = true
		if perShard {
			r.pinTargets[i] = renderTarget(r.Target, t.pinRoute[i].cell, shardText(s, t.shards), r.Name)
		} else {
			r.pinTargets[i] = r.cellTargets[t.pinRoute[i].cellIdx]
		}
	}
	r.missing = Decision{Topic: r.Name, Shard: -1, Version: t.version, Cause: CauseMissingKey}
	if r.OnMissingKey == OnMissingKeyGlobal {
		gi := t.effective(int32(t.globalIdx))
		r.globalTarget = r.cellTargets[gi]
		r.missing.Reason = ReasonGlobal
		r.missing.Cell = t.cells[gi].Name
		r.missing.Target = r.globalTarget
		r.missing.Explain = fmt.Sprintf("no key: empty key from %s: global cell %s", r.Key, r.missing.Cell)
	} else {
		r.missing.Reason = ReasonDLQ
		r.missing.Target = *r.DLQ
		r.missing.Explain = fmt.Sprintf("no key: empty key from %s: dead-letter", r.Key)
	}
	return r
}
