package config

import (
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"
	"sync"

	"github.com/cellbridge/cellbridge/router"
)

// Broker is one named broker connection: its type and the settings of that
// type's kind.
type Broker struct {
	Type string
	// Settings holds the broker's other fields, decoded strictly into the
	// settings struct of Type's kind (BrokerKind.NewSettings); nil when the
	// type is missing or unknown.
	Settings BrokerSettings
}

// Paths returns every file path the broker's settings name (fields of type
// Path, resolved against the configuration file), by field path relative
// to the broker ("creds", "tls.ca").
func (b *Broker) Paths() map[string]string {
	out := map[string]string{}
	if b == nil || b.Settings == nil {
		return out
	}
	var walk func(v reflect.Value, prefix string)
	walk = func(v reflect.Value, prefix string) {
		for v.Kind() == reflect.Pointer {
			if v.IsNil() {
				return
			}
			v = v.Elem()
		}
		if v.Kind() != reflect.Struct {
			return
		}
		for i := range v.NumField() {
			f := v.Type().Field(i)
			tag := strings.Split(f.Tag.Get("yaml"), ",")[0]
			if !f.IsExported() || tag == "" || tag == "-" {
				continue
			}
			switch fv := v.Field(i); {
			case fv.Type() == pathType:
				if fv.String() != "" {
					out[prefix+tag] = fv.String()
				}
			default:
				walk(fv, prefix+tag+".")
			}
		}
	}
	walk(reflect.ValueOf(b.Settings), "")
	return out
}

// BrokerSettings is the settings struct of one broker kind, a pointer to a
// struct whose exported fields carry `yaml` tags (none of them `type`, which
// selects the kind). Fields of type Secret are
// credentials (${ENV}, file:/path or inline); fields of type Path are files
// relative to the configuration file.
type BrokerSettings interface {
	// Validate reports every problem of the settings to c, naming fields
	// relative to the broker ("url", "tls.ca"). It may read the files the
	// settings name, nothing else.
	Validate(c *BrokerCheck)
}

// SharedStoreUser is implemented by broker settings that can need the
// dedupe store every replica shares and that outlives the process
// (`dedupe.store: jetstream`): SharedStoreNeed says why these settings need
// it, or returns "" when they do not. The memory store is refused for them.
type SharedStoreUser interface {
	SharedStoreNeed() string
}

// BrokerKind is what the configuration knows of one kind of broker: the
// value of `type:` that selects it, its settings, and which rule endpoints
// it serves. Each kind registers itself (RegisterBrokerKind); nothing in this
// package names a kind except NATSType, whose brokers the embedded default
// and the jetstream dedupe store use.
type BrokerKind struct {
	Type string
	// NewSettings returns an empty settings struct to decode into.
	NewSettings func() BrokerSettings
	// ServesSource and ServesTarget report whether a topic rule's source,
	// or a rendered target or DLQ, is written for this kind (router rules
	// name a NATS stream and subject, or a RocketMQ topic).
	ServesSource func(router.Source) bool
	ServesTarget func(router.Target) bool
}

// NATSType is the type of NATS brokers. EmbeddedBroker is the name of the
// one broker of the embedded default (an in-process NATS server).
const (
	NATSType       = "nats"
	EmbeddedBroker = "nats"
)

var kinds = struct {
	sync.RWMutex
	m map[string]BrokerKind
}{m: map[string]BrokerKind{}}

// RegisterBrokerKind adds a broker kind. It is meant to be called from init
// functions; a second kind of the same type panics.
func RegisterBrokerKind(k BrokerKind) {
	kinds.Lock()
	defer kinds.Unlock()
	if _, dup := kinds.m[k.Type]; dup || k.Type == "" || k.NewSettings == nil || k.ServesSource == nil || k.ServesTarget == nil {
		panic(fmt.Sprintf("config: broker kind %q registered twice or incomplete", k.Type))
	}
	// The settings share a mapping with `type:` and are decoded next to it.
	st := reflect.TypeOf(k.NewSettings())
	if st.Kind() != reflect.Pointer || st.Elem().Kind() != reflect.Struct {
		panic(fmt.Sprintf("config: broker kind %q: settings must be a pointer to a struct, not %s", k.Type, st))
	}
	if _, ok := yamlField(st.Elem(), "type"); ok {
		panic(fmt.Sprintf("config: broker kind %q: settings must not have a field named type", k.Type))
	}
	if _, ok := st.Elem().FieldByName(brokerTypeField); ok {
		panic(fmt.Sprintf("config: broker kind %q: settings must not have a Go field named %s", k.Type, brokerTypeField))
	}
	kinds.m[k.Type] = k
}

// brokerKindOf returns the registered kind of type typ.
func brokerKindOf(typ string) (BrokerKind, bool) {
	kinds.RLock()
	defer kinds.RUnlock()
	k, ok := kinds.m[typ]
	return k, ok
}

// brokerKinds returns every registered kind, sorted by type.
func brokerKinds() []BrokerKind {
	kinds.RLock()
	defer kinds.RUnlock()
	out := make([]BrokerKind, 0, len(kinds.m))
	for _, k := range kinds.m {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Type < out[j].Type })
	return out
}

// kindList renders the registered types as "a, b or c".
func kindList() string {
	var names []string
	for _, k := range brokerKinds() {
		names = append(names, k.Type)
	}
	switch len(names) {
	case 0:
		return "none registered in this build"
	case 1:
		return names[0]
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// BrokerCheck collects the problems of one broker's settings.
type BrokerCheck struct {
	path string // "brokers.<name>"
	bad  func(field, format string, args ...any)
}

// Errorf reports a problem of field (relative to the broker; "" for the
// broker as a whole).
func (c *BrokerCheck) Errorf(field, format string, args ...any) {
	p := c.path
	if field != "" {
		p += "." + field
	}
	c.bad(p, format, args...)
}

// Readable reports field when the file at path cannot be opened.
func (c *BrokerCheck) Readable(field, path string) {
	f, err := os.Open(path)
	if err != nil {
		c.Errorf(field, "cannot read file: %v", unwrapPathErr(err))
		return
	}
	f.Close()
}

// validateBrokers checks every broker's name and type and lets its kind
// check the settings.
func (c *Config) validateBrokers(bad func(field, format string, args ...any)) {
	for _, name := range c.brokerNames() {
		b := c.Brokers[name]
		p := "brokers." + name
		if !brokerNameRE.MatchString(name) {
			bad(p, "broker names use letters, digits, '_', '-' and '.'")
		}
		if b == nil {
			bad(p, "empty broker (want at least type)")
			continue
		}
		if _, ok := brokerKindOf(b.Type); !ok {
			if b.Type == "" {
				bad(p+".type", "required: %s", kindList())
			} else {
				bad(p+".type", "unknown broker type %q (want %s)", b.Type, kindList())
			}
			continue
		}
		b.Settings.Validate(&BrokerCheck{path: p, bad: bad})
	}
}

// otherKindsField returns the types of the other kinds whose settings have
// field, so that a field of the wrong kind is named as such.
func otherKindsField(typ, field string) []string {
	var out []string
	for _, k := range brokerKinds() {
		if k.Type == typ {
			continue
		}
		if _, ok := yamlField(reflect.TypeOf(k.NewSettings()).Elem(), field); ok {
			out = append(out, k.Type)
		}
	}
	return out
}

// brokerType returns the type of broker name, as the running bridge sees it:
// the embedded default has exactly one NATS broker, EmbeddedBroker.
func (c *Config) brokerType(name string) (string, bool) {
	if c.Embedded() {
		return NATSType, name == EmbeddedBroker
	}
	b := c.Brokers[name]
	if b == nil {
		return "", false
	}
	return b.Type, true
}

// servingKind returns the type of the kind that serves an endpoint.
func servingKind(serves func(BrokerKind) bool) string {
	for _, k := range brokerKinds() {
		if serves(k) {
			return k.Type
		}
	}
	return "(unknown)"
}

// CheckRules cross-checks the rules against the brokers: every broker a rule
// names as source, target (rendered for every cell when it holds {cell}) or
// DLQ must exist and be of a kind that serves the rule's endpoint. Problems
// are located in the rule files (where the broker is named) and listed all
// at once as Errors.
func (c *Config) CheckRules(t *router.Table) error {
	var errs Errors
	known := "brokers: " + strings.Join(c.brokerNames(), ", ")
	if c.Embedded() {
		known = fmt.Sprintf("the embedded default has only the broker %q", EmbeddedBroker)
	}
	where := "config " + c.File
	check := func(r *router.Rule, field, broker, context string, serves func(BrokerKind) bool) {
		typ, ok := c.brokerType(broker)
		k, knownKind := brokerKindOf(typ)
		switch {
		case !ok:
			errs = append(errs, Problem{File: r.File, Line: r.Line, Field: r.Name + "." + field,
				Msg: fmt.Sprintf("broker %q%s is not defined in %s (%s)", broker, context, where, known)})
		case !knownKind || !serves(k):
			errs = append(errs, Problem{File: r.File, Line: r.Line, Field: r.Name + "." + field,
				Msg: fmt.Sprintf("broker %q%s is of type %s in %s, but the rule needs a %s broker", broker, context, typ, where, servingKind(serves))})
		}
	}
	for _, r := range t.Rules() {
		check(r, "source.broker", r.Source.Broker, "", func(k BrokerKind) bool { return k.ServesSource(r.Source) })
		seen := map[string]bool{}
		for _, cell := range t.Cells() {
			tg := r.Render(cell.Name, -1)
			if seen[tg.Broker] {
				continue
			}
			seen[tg.Broker] = true
			ctx := ""
			if tg.Broker != r.Target.Broker {
				ctx = fmt.Sprintf(" (target broker %q for cell %s)", r.Target.Broker, cell.Name)
			}
			check(r, "target.broker", tg.Broker, ctx, func(k BrokerKind) bool { return k.ServesTarget(tg) })
		}
		if d := r.DLQ; d != nil {
			tg := router.Target{Broker: d.Broker, Subject: d.Subject, Topic: d.Topic}
			check(r, "dlq.broker", d.Broker, "", func(k BrokerKind) bool { return k.ServesTarget(tg) })
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return errs
}

func (c *Config) brokerNames() []string {
	names := make([]string, 0, len(c.Brokers))
	for n := range c.Brokers {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
