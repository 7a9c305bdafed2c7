package config

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/router"
)

// Config is the bridge configuration file of `cellbridge run -config FILE`.
// It is built by Load / Parse (strict YAML, environment and file
// secrets resolved, defaults applied) and is read-only afterwards.
type Config struct {
	// Rules is the rule directory; a relative path is relative to the
	// directory of the config file.
	Rules    string             `yaml:"rules"`
	Brokers  map[string]*Broker `yaml:"brokers"`
	Dedupe   DedupeConfig       `yaml:"dedupe"`
	HTTP     HTTPConfig         `yaml:"http"`
	Pipeline PipelineConfig     `yaml:"pipeline"`
	Log      LogConfig          `yaml:"log"`

	// File is the config file's path ("" for the built-in configuration).
	File string `yaml:"-"`
	// pos maps a dotted field path (brokers.nats.url) to its line in File,
	// so that semantic errors found after decoding still name a line.
	pos map[string]int
	// inlineSecrets lists secret fields written in clear in the file (the
	// bridge warns about them at start-up).
	inlineSecrets []string
}

// Broker is one named broker connection. The fields of the other type must
// stay empty (Validate reports them).
type Broker struct {
	Type string `yaml:"type"` // nats | rocketmq

	// NATS.
	URL      string     `yaml:"url"` // one URL or a comma-separated list
	TLS      *TLSConfig `yaml:"tls"`
	Creds    string     `yaml:"creds"` // path of a .creds file (JWT + nkey seed)
	User     string     `yaml:"user"`
	Password Secret     `yaml:"password"`
	Token    Secret     `yaml:"token"`

	// RocketMQ.
	Nameservers    []string `yaml:"nameservers"` // IP:port of each name server
	AccessKey      Secret   `yaml:"accessKey"`
	SecretKey      Secret   `yaml:"secretKey"`
	Namespace      string   `yaml:"namespace"`
	InstancePrefix string   `yaml:"instancePrefix"`
	ExactlyOnce    string   `yaml:"exactlyOnce"` // none | transactional
}

// Broker types.
const (
	BrokerNATS     = "nats"
	BrokerRocketMQ = "rocketmq"
)

// TLSConfig holds PEM file paths; relative paths are relative to the config
// file. CA alone verifies the server; Cert+Key add a client certificate.
type TLSConfig struct {
	CA   string `yaml:"ca"`
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// DedupeConfig selects the dedupe store.
type DedupeConfig struct {
	Store string `yaml:"store"` // jetstream | memory
	// jetstream
	Broker   string `yaml:"broker"`
	Bucket   string `yaml:"bucket"`
	Replicas int    `yaml:"replicas"`
	// memory
	Size int `yaml:"size"`
	// both
	TTL        Duration `yaml:"ttl"`
	ReserveTTL Duration `yaml:"reserveTTL"`
}

// Dedupe stores.
const (
	DedupeJetStream = "jetstream"
	DedupeMemory    = "memory"
)

// HTTPConfig is the HTTP server of /metrics, /healthz, /readyz, /route, /status.
type HTTPConfig struct {
	Listen string `yaml:"listen"`
}

// PipelineConfig holds the pipeline limits; every field has a default.
type PipelineConfig struct {
	MaxInFlight     int         `yaml:"maxInFlight"`
	Workers         int         `yaml:"workers"`
	FetchBatch      int         `yaml:"fetchBatch"`
	HoldDelay       Duration    `yaml:"holdDelay"`
	Retry           RetryConfig `yaml:"retry"`
	MaxMessageBytes ByteSize    `yaml:"maxMessageBytes"`
	MaxHops         int         `yaml:"maxHops"`
	DrainTimeout    Duration    `yaml:"drainTimeout"`
	ProgressTimeout Duration    `yaml:"progressTimeout"`
	AckWait         Duration    `yaml:"ackWait"`
	MaxHeld         int         `yaml:"maxHeld"`
	HeldRecheck     Duration    `yaml:"heldRecheck"`
	Lanes           int         `yaml:"lanes"`
}

// RetryConfig is the capped exponential backoff of sink and dedupe retries.
type RetryConfig struct {
	Initial Duration `yaml:"initial"`
	Max     Duration `yaml:"max"`
}

// LogConfig configures log/slog.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug | info | warn | error
	Format string `yaml:"format"` // auto | json | text
}

// defaultEntry is one row of the defaults table.
type defaultEntry struct {
	Field, Value, Doc string
}

// configDefaults is the single table of defaults: applyDefaults reads it,
// `cellbridge run -defaults` prints it, and the README copies it. A value of
// "" documents a computed default (Doc says how it is computed).
var configDefaults = []defaultEntry{
	{"rules", "", "rule directory; required with brokers; built-in: the example rules (deploy/rules)"},
	{"brokers", "", "none: the embedded default (in-process nats-server with JetStream, broker name `nats`)"},
	{"dedupe.store", "", "`jetstream` when a NATS broker exists (and for the embedded default), else `memory`"},
	{"dedupe.broker", "", "the broker named `nats`, else the only NATS broker"},
	{"dedupe.bucket", "cellbridge-dedupe", "JetStream KV bucket, shared by all replicas"},
	{"dedupe.replicas", "1", "KV bucket replicas"},
	{"dedupe.size", "1000000", "memory store: max keys (LRU beyond)"},
	{"dedupe.ttl", "10m", "how long a committed key suppresses a repeat"},
	{"dedupe.reserveTTL", "30s", "a reservation of a crashed worker/replica frees itself after this"},
	{"http.listen", ":9090", "/metrics, /healthz, /readyz, /route, /status"},
	{"pipeline.maxInFlight", "4096", "messages accepted and not yet settled, held ones excluded (the NATS consumer's MaxAckPending is maxInFlight+maxHeld+fetchBatch)"},
	{"pipeline.lanes", "", "ordering lanes: maxInFlight/4, at least 1 (one key always uses one lane; one message per key between publish and confirm; keys sharing a lane do not wait for each other)"},
	{"pipeline.workers", "", "goroutines that reserve/commit/ack: GOMAXPROCS with the memory store, 256 with jetstream (each KV round trip holds one)"},
	{"pipeline.fetchBatch", "1024", "messages requested ahead from the source (pull batch)"},
	{"pipeline.holdDelay", "5s", "redelivery delay of held messages that could not be parked"},
	{"pipeline.retry.initial", "100ms", "first sink/dedupe retry delay (doubles each time)"},
	{"pipeline.retry.max", "5s", "retry delay cap"},
	{"pipeline.maxMessageBytes", "1MiB", "larger messages go to the DLQ (too_large)"},
	{"pipeline.maxHops", "4", "messages with more Cell-Hops go to the DLQ (too_many_hops)"},
	{"pipeline.drainTimeout", "20s", "on shutdown: time to finish in-flight messages"},
	{"pipeline.progressTimeout", "60s", "/readyz fails when a backlog exists and nothing was forwarded for this long"},
	{"pipeline.ackWait", "30s", "source redelivery timeout (longer than the worst processing time)"},
	{"pipeline.maxHeld", "10000", "held messages parked in memory (in order per key); beyond it they are redelivered after holdDelay"},
	{"pipeline.heldRecheck", "1s", "how often parked messages are re-resolved without a rules change"},
	{"log.level", "info", "debug | info | warn | error"},
	{"log.format", "auto", "auto (JSON when stderr is not a terminal) | json | text"},
}

// Secret is a credential. Its String, GoString and slog value are redacted
// so that it never reaches a log line by accident; Value returns it.
type Secret string

// Value returns the secret in clear.
func (s Secret) Value() string { return string(s) }

// String returns "" or "<redacted>".
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return "<redacted>"
}

// GoString keeps %#v from printing the secret.
func (s Secret) GoString() string { return strconv.Quote(s.String()) }

// MarshalText keeps encoders from printing the secret.
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Duration is a time.Duration written as a Go duration string ("250ms", "10m").
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String formats like time.Duration.
func (d Duration) String() string { return time.Duration(d).String() }

func (d *Duration) parseScalar(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("want a duration like 500ms, 5s or 10m, got %q", s)
	}
	if v < 0 {
		return fmt.Errorf("must not be negative, got %s", s)
	}
	*d = Duration(v)
	return nil
}

// ByteSize is a size in bytes written as an integer or with a unit
// (B, KiB, MiB, GiB, KB, MB, GB).
type ByteSize int64

var byteUnits = map[string]int64{"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
	"kb": 1e3, "mb": 1e6, "gb": 1e9, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

func (b *ByteSize) parseScalar(s string) error {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	unit, ok := byteUnits[strings.ToLower(strings.TrimSpace(t[i:]))]
	if err != nil || !ok || n > (1<<62)/unit {
		return fmt.Errorf("want a size like 1048576, 512KiB or 1MiB, got %q", s)
	}
	*b = ByteSize(n * unit)
	return nil
}

// scalarParser is implemented by field types that parse their own text.
type scalarParser interface{ parseScalar(string) error }

// Problem is one configuration error.
type Problem struct {
	File  string
	Line  int // 0: not from a line (a default or a missing field)
	Field string
	Msg   string
}

// String formats "file:line: field: message".
func (p Problem) String() string {
	var b strings.Builder
	b.WriteString(p.File)
	if p.Line > 0 {
		fmt.Fprintf(&b, ":%d", p.Line)
	}
	if p.Field != "" {
		b.WriteString(": ")
		b.WriteString(p.Field)
	}
	b.WriteString(": ")
	b.WriteString(p.Msg)
	return b.String()
}

// Errors lists every problem of a config file, in file order.
type Errors []Problem

// Error prints one problem per line.
func (e Errors) Error() string {
	s := make([]string, len(e))
	for i, p := range e {
		s[i] = p.String()
	}
	return strings.Join(s, "\n")
}

// Load reads, parses, resolves and validates the config file at path.
// The error is Errors (every problem) or an I/O error.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, perrs := parseConfig(path, data)
	if c == nil {
		return nil, perrs // not even YAML
	}
	verr := c.Validate()
	if len(perrs) == 0 {
		if verr != nil {
			return nil, verr
		}
		return c, nil
	}
	// Report the rest of the file's problems too, except those that only
	// follow from a field that failed to decode (it stayed zero).
	all := perrs
	var ve Errors
	if errors.As(verr, &ve) {
		for _, p := range ve {
			if !coveredBy(p.Field, perrs) {
				all = append(all, p)
			}
		}
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].Line < all[j].Line })
	return nil, all
}

// coveredBy reports whether field, or a parent or child of it, already has a
// problem in errs.
func coveredBy(field string, errs Errors) bool {
	for _, p := range errs {
		if p.Field == field || strings.HasPrefix(field, p.Field+".") || strings.HasPrefix(p.Field, field+".") ||
			strings.HasPrefix(field, p.Field+"[") {
			return true
		}
	}
	return false
}

// Default is the built-in configuration (no file): the embedded
// default with every default applied.
func Default() *Config {
	c := &Config{File: "(built-in)", pos: map[string]int{}}
	c.applyDefaults()
	return c
}

// Parse decodes data strictly (unknown fields, wrong types and
// duplicate keys are errors), expands ${ENV} references, reads file: secrets
// and applies defaults. It does not run Validate. file names the source in
// errors and anchors relative paths.
func Parse(file string, data []byte) (*Config, error) {
	c, errs := parseConfig(file, data)
	if len(errs) > 0 {
		return nil, errs
	}
	return c, nil
}

// Embedded reports whether the configuration runs the embedded default (no
// brokers configured).
func (c *Config) Embedded() bool { return len(c.Brokers) == 0 }

// line returns the line of path or of its closest configured parent.
func (c *Config) line(path string) int {
	for path != "" {
		if l, ok := c.pos[path]; ok {
			return l
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return 0
}

// set reports whether the file set path.
func (c *Config) set(path string) bool { _, ok := c.pos[path]; return ok }

// IsSet reports whether path (a dotted field path such as "http.listen")
// was chosen explicitly: written in the file or overridden.
func (c *Config) IsSet(path string) bool { return c.set(path) }

// OverrideHTTPListen sets http.listen as if the file had set it (a
// command-line flag wins over the file); call Validate afterwards.
func (c *Config) OverrideHTTPListen(addr string) {
	c.HTTP.Listen = addr
	c.pos["http.listen"] = 0
}

// InlineSecrets lists the secret fields written in clear in the file, so
// that the bridge can warn about them.
func (c *Config) InlineSecrets() []string { return c.inlineSecrets }

func (c *Config) resolvePaths() {
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) && c.File != "" {
			*p = filepath.Join(filepath.Dir(c.File), *p)
		}
	}
	abs(&c.Rules)
	for _, b := range c.Brokers {
		if b == nil {
			continue
		}
		abs(&b.Creds)
		if b.TLS != nil {
			abs(&b.TLS.CA)
			abs(&b.TLS.Cert)
			abs(&b.TLS.Key)
		}
	}
}

// applyDefaults fills every unset field from configDefaults and computes the
// dedupe store defaults.
func (c *Config) applyDefaults() {
	root := reflect.ValueOf(c).Elem()
	for _, e := range configDefaults {
		if e.Value == "" || c.set(e.Field) {
			continue
		}
		f := fieldByPath(root, e.Field)
		if !f.IsValid() || !f.IsZero() {
			continue
		}
		if err := setScalar(f, e.Value); err != nil {
			panic(fmt.Sprintf("config default %s=%q: %v", e.Field, e.Value, err)) // a bug in the table
		}
	}
	d := &c.Dedupe
	if d.Store == "" {
		d.Store = DedupeMemory
		if c.Embedded() || c.natsBrokerDefault() != "" {
			d.Store = DedupeJetStream
		}
	}
	if d.Store == DedupeJetStream && d.Broker == "" {
		if c.Embedded() {
			d.Broker = "nats"
		} else {
			d.Broker = c.natsBrokerDefault()
		}
	}
}

// natsBrokerDefault is the broker named nats, else the only NATS broker.
func (c *Config) natsBrokerDefault() string {
	if b := c.Brokers["nats"]; b != nil && b.Type == BrokerNATS {
		return "nats"
	}
	var only string
	for name, b := range c.Brokers {
		if b != nil && b.Type == BrokerNATS {
			if only != "" {
				return ""
			}
			only = name
		}
	}
	return only
}

var (
	brokerNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)
	bucketRE     = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
)

// Validate checks every field and returns Errors listing every
// problem, or nil. It reads nothing but the TLS and creds files it checks
// for readability; rule cross-checks are in CheckRules.
func (c *Config) Validate() error {
	var errs Errors
	bad := func(field, format string, args ...any) {
		errs = append(errs, Problem{File: c.File, Line: c.line(field), Field: field, Msg: fmt.Sprintf(format, args...)})
	}
	readable := func(field, path string) {
		f, err := os.Open(path)
		if err != nil {
			bad(field, "cannot read file: %v", unwrapPathErr(err))
			return
		}
		f.Close()
	}

	if c.Rules == "" && !c.Embedded() {
		bad("rules", "required when brokers are configured (the rule directory)")
	} else if c.Rules != "" {
		if st, err := os.Stat(c.Rules); err != nil {
			bad("rules", "rule directory: %v", unwrapPathErr(err))
		} else if !st.IsDir() {
			bad("rules", "%s is not a directory", c.Rules)
		}
	}

	names := make([]string, 0, len(c.Brokers))
	for name := range c.Brokers {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		b := c.Brokers[name]
		p := "brokers." + name
		if !brokerNameRE.MatchString(name) {
			bad(p, "broker names use letters, digits, '_', '-' and '.'")
		}
		if b == nil {
			bad(p, "empty broker (want at least type)")
			continue
		}
		natsOnly := map[string]bool{"url": b.URL != "", "tls": b.TLS != nil, "creds": b.Creds != "",
			"user": b.User != "", "password": b.Password != "", "token": b.Token != ""}
		rmqOnly := map[string]bool{"nameservers": len(b.Nameservers) > 0, "accessKey": b.AccessKey != "",
			"secretKey": b.SecretKey != "", "namespace": b.Namespace != "", "instancePrefix": b.InstancePrefix != "",
			"exactlyOnce": b.ExactlyOnce != ""}
		wrongType := func(fields map[string]bool, typ string) {
			for _, f := range sortedTrue(fields) {
				bad(p+"."+f, "only valid for type %s", typ)
			}
		}
		switch b.Type {
		case BrokerNATS:
			wrongType(rmqOnly, BrokerRocketMQ)
			c.validateNATS(p, b, bad, readable)
		case BrokerRocketMQ:
			wrongType(natsOnly, BrokerNATS)
			c.validateRocketMQ(p, b, bad)
		case "":
			bad(p+".type", "required: nats or rocketmq")
		default:
			bad(p+".type", "unknown broker type %q (want nats or rocketmq)", b.Type)
		}
	}

	d := c.Dedupe
	switch d.Store {
	case DedupeJetStream:
		if c.set("dedupe.size") {
			bad("dedupe.size", "only valid for store memory")
		}
		switch b := c.Brokers[d.Broker]; {
		case c.Embedded():
			if d.Broker != "nats" {
				bad("dedupe.broker", "the embedded default has only the broker \"nats\", not %q", d.Broker)
			}
		case d.Broker == "":
			bad("dedupe.broker", "required for store jetstream when there is no broker named \"nats\" or several NATS brokers")
		case b == nil:
			bad("dedupe.broker", "unknown broker %q (brokers: %s)", d.Broker, strings.Join(names, ", "))
		case b.Type != BrokerNATS:
			bad("dedupe.broker", "broker %q is of type %s; the jetstream store needs a nats broker", d.Broker, b.Type)
		}
		if !bucketRE.MatchString(d.Bucket) {
			bad("dedupe.bucket", "invalid KV bucket name %q (letters, digits, '_' and '-')", d.Bucket)
		}
		if d.Replicas < 1 || d.Replicas > 5 {
			bad("dedupe.replicas", "must be 1..5, got %d", d.Replicas)
		}
	case DedupeMemory:
		for _, f := range []string{"broker", "bucket", "replicas"} {
			if c.set("dedupe." + f) {
				bad("dedupe."+f, "only valid for store jetstream")
			}
		}
		if d.Size < 1 {
			bad("dedupe.size", "must be positive, got %d", d.Size)
		}
	default:
		bad("dedupe.store", "unknown store %q (want jetstream or memory)", d.Store)
	}
	if d.TTL.D() < time.Second {
		bad("dedupe.ttl", "must be at least 1s, got %s", d.TTL)
	}
	if d.ReserveTTL.D() < 100*time.Millisecond {
		bad("dedupe.reserveTTL", "must be at least 100ms, got %s", d.ReserveTTL)
	}
	// The KV store's per-message TTL counts whole seconds: compare rounded up.
	if rounded := (d.ReserveTTL.D() + time.Second - 1).Truncate(time.Second); rounded >= d.TTL.D() {
		bad("dedupe.reserveTTL", "must be less than dedupe.ttl (%s) after rounding up to whole seconds, got %s", d.TTL, d.ReserveTTL)
	}

	if _, port, err := net.SplitHostPort(c.HTTP.Listen); err != nil {
		bad("http.listen", "want host:port or :port, got %q", c.HTTP.Listen)
	} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		bad("http.listen", "invalid port %q", port)
	}

	// The pipeline's bounds are the pipeline's own (bridge.Config.Validate):
	// written once, for this file and for every other caller of bridge.New.
	var fe bridge.ConfigErrors
	if errors.As(c.Pipeline.Bridge().Validate(), &fe) {
		for _, f := range fe {
			bad("pipeline."+f.Field, "%s", f.Msg)
		}
	}

	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "unknown level %q (want debug, info, warn or error)", c.Log.Level)
	}
	switch c.Log.Format {
	case "auto", "json", "text":
	default:
		bad("log.format", "unknown format %q (want auto, json or text)", c.Log.Format)
	}

	if len(errs) == 0 {
		return nil
	}
	sort.SliceStable(errs, func(i, j int) bool { return errs[i].Line < errs[j].Line })
	return errs
}

func sortedTrue(m map[string]bool) []string {
	var s []string
	for k, v := range m {
		if v {
			s = append(s, k)
		}
	}
	sort.Strings(s)
	return s
}

func (c *Config) validateNATS(p string, b *Broker, bad func(string, string, ...any), readable func(string, string)) {
	if b.URL == "" {
		bad(p+".url", "required for type nats (nats://host:4222)")
	}
	for u := range strings.SplitSeq(b.URL, ",") {
		u = strings.TrimSpace(u)
		if u == "" && b.URL != "" {
			bad(p+".url", "empty URL in list %q", b.URL)
			continue
		}
		if u == "" {
			continue
		}
		pu, err := url.Parse(u)
		if err != nil || pu.Host == "" {
			bad(p+".url", "invalid URL %q (want nats://host:port)", u)
			continue
		}
		switch pu.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			bad(p+".url", "unsupported scheme %q in %q (want nats, tls, ws or wss)", pu.Scheme, u)
		}
	}
	if t := b.TLS; t != nil {
		if (t.Cert == "") != (t.Key == "") {
			bad(p+".tls", "cert and key go together (client certificate)")
		}
		if t.CA == "" && t.Cert == "" {
			bad(p+".tls", "empty: set ca and/or cert+key")
		}
		for f, v := range map[string]string{"ca": t.CA, "cert": t.Cert, "key": t.Key} {
			if v != "" {
				readable(p+".tls."+f, v)
			}
		}
	}
	if b.Creds != "" {
		readable(p+".creds", strings.TrimPrefix(b.Creds, "file:"))
	}
	if (b.User == "") != (b.Password == "") {
		if b.User == "" {
			bad(p+".user", "required with password")
		} else {
			bad(p+".password", "required with user")
		}
	}
	n := 0
	for _, set := range []bool{b.User != "" || b.Password != "", b.Token != "", b.Creds != ""} {
		if set {
			n++
		}
	}
	if n > 1 {
		bad(p, "choose one authentication: user/password, token or creds")
	}
}

func (c *Config) validateRocketMQ(p string, b *Broker, bad func(string, string, ...any)) {
	if len(b.Nameservers) == 0 {
		bad(p+".nameservers", "required for type rocketmq (a list of IP:port)")
	}
	for i, ns := range b.Nameservers {
		host, port, err := net.SplitHostPort(ns)
		n, perr := strconv.Atoi(port)
		switch {
		case err != nil || host == "" || perr != nil || n < 1 || n > 65535:
			bad(fmt.Sprintf("%s.nameservers[%d]", p, i), "want IP:port, got %q", ns)
		case net.ParseIP(host) == nil:
			// The RocketMQ client only accepts IP addresses here.
			bad(fmt.Sprintf("%s.nameservers[%d]", p, i), "want IP:port (the RocketMQ client refuses host names), got %q", ns)
		}
	}
	if (b.AccessKey == "") != (b.SecretKey == "") {
		if b.AccessKey == "" {
			bad(p+".accessKey", "required with secretKey")
		} else {
			bad(p+".secretKey", "required with accessKey")
		}
	}
	switch b.ExactlyOnce {
	case "", "none", "transactional":
	default:
		bad(p+".exactlyOnce", "unknown mode %q (want none or transactional)", b.ExactlyOnce)
	}
}

// brokerType returns the type of broker name, as the running bridge sees it:
// the embedded default has exactly one NATS broker named "nats".
func (c *Config) brokerType(name string) (string, bool) {
	if c.Embedded() {
		return BrokerNATS, name == "nats"
	}
	b := c.Brokers[name]
	if b == nil {
		return "", false
	}
	return b.Type, true
}

// CheckRules cross-checks the rules against the brokers: every broker a rule
// names as source, target (rendered for every cell when it holds {cell}) or
// DLQ must exist and be of the rule's kind. Problems are located in the rule
// files (where the broker is named) and listed all at once as Errors.
func (c *Config) CheckRules(t *router.Table) error {
	var errs Errors
	known := "brokers: " + strings.Join(c.brokerNames(), ", ")
	if c.Embedded() {
		known = "the embedded default has only the broker \"nats\""
	}
	where := "config " + c.File
	check := func(r *router.Rule, field, broker, wantType, context string) {
		typ, ok := c.brokerType(broker)
		switch {
		case !ok:
			errs = append(errs, Problem{File: r.File, Line: r.Line, Field: r.Name + "." + field,
				Msg: fmt.Sprintf("broker %q%s is not defined in %s (%s)", broker, context, where, known)})
		case typ != wantType:
			errs = append(errs, Problem{File: r.File, Line: r.Line, Field: r.Name + "." + field,
				Msg: fmt.Sprintf("broker %q%s is of type %s in %s, but the rule needs a %s broker", broker, context, typ, where, wantType)})
		}
	}
	kind := func(subject string) string {
		if subject != "" {
			return BrokerNATS
		}
		return BrokerRocketMQ
	}
	for _, r := range t.Rules() {
		srcType := BrokerRocketMQ
		if r.Source.IsNATS() {
			srcType = BrokerNATS
		}
		check(r, "source.broker", r.Source.Broker, srcType, "")
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
			check(r, "target.broker", tg.Broker, kind(tg.Subject), ctx)
		}
		if r.DLQ != nil {
			check(r, "dlq.broker", r.DLQ.Broker, kind(r.DLQ.Subject), "")
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

// Bridge maps the pipeline section onto bridge.Config.
func (p PipelineConfig) Bridge() bridge.Config {
	return bridge.Config{
		MaxInFlight:     p.MaxInFlight,
		Workers:         p.Workers,
		FetchBatch:      p.FetchBatch,
		HoldDelay:       p.HoldDelay.D(),
		MaxHeld:         p.MaxHeld,
		HeldRecheck:     p.HeldRecheck.D(),
		Retry:           bridge.RetryConfig{Initial: p.Retry.Initial.D(), Max: p.Retry.Max.D()},
		MaxMessageBytes: int64(p.MaxMessageBytes),
		MaxHops:         p.MaxHops,
		DrainTimeout:    p.DrainTimeout.D(),
		ProgressTimeout: p.ProgressTimeout.D(),
		AckWait:         p.AckWait.D(),
		Lanes:           p.Lanes,
	}
}

// WriteDefaults writes the defaults table as Markdown (the README copies
// it; `cellbridge run -defaults` prints it).
func WriteDefaults(w io.Writer) {
	fmt.Fprintln(w, "| field | default | meaning |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, e := range configDefaults {
		v := "`" + e.Value + "`"
		if e.Value == "" {
			v = "(computed)"
		}
		fmt.Fprintf(w, "| `%s` | %s | %s |\n", e.Field, v, strings.ReplaceAll(e.Doc, "|", "\\|"))
	}
}
