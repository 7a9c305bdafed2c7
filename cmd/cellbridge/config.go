package main

import (
	"errors"
	"fmt"
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

	"gopkg.in/yaml.v3"

	"github.com/cellbridge/cellbridge/router"
)

// Config is the bridge configuration file of `cellbridge run -config FILE`.
// It is built by LoadConfig / ParseConfig (strict YAML, environment and file
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
	Nameservers    []string `yaml:"nameservers"` // host:port of each name server
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
	{"pipeline.maxInFlight", "4096", "messages accepted and not yet settled, held ones excluded (the consumer's MaxAckPending is maxInFlight+maxHeld)"},
	{"pipeline.lanes", "", "ordering lanes: 4 x maxInFlight (one key always uses one lane; one message per lane between publish and confirm)"},
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

// ConfigErrors lists every problem of a config file, in file order.
type ConfigErrors []Problem

// Error prints one problem per line.
func (e ConfigErrors) Error() string {
	s := make([]string, len(e))
	for i, p := range e {
		s[i] = p.String()
	}
	return strings.Join(s, "\n")
}

// LoadConfig reads, parses, resolves and validates the config file at path.
// The error is ConfigErrors (every problem) or an I/O error.
func LoadConfig(path string) (*Config, error) {
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
	var ve ConfigErrors
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
func coveredBy(field string, errs ConfigErrors) bool {
	for _, p := range errs {
		if p.Field == field || strings.HasPrefix(field, p.Field+".") || strings.HasPrefix(p.Field, field+".") ||
			strings.HasPrefix(field, p.Field+"[") {
			return true
		}
	}
	return false
}

// DefaultConfig is the built-in configuration (no file): the embedded
// default with every default applied.
func DefaultConfig() *Config {
	c := &Config{File: "(built-in)", pos: map[string]int{}}
	c.applyDefaults()
	return c
}

// ParseConfig decodes data strictly (unknown fields, wrong types and
// duplicate keys are errors), expands ${ENV} references, reads file: secrets
// and applies defaults. It does not run Validate. file names the source in
// errors and anchors relative paths.
func ParseConfig(file string, data []byte) (*Config, error) {
	c, errs := parseConfig(file, data)
	if len(errs) > 0 {
		return nil, errs
	}
	return c, nil
}

// parseConfig decodes what it can: it returns the config (nil only when
// data is not YAML at all) and the decoding problems.
func parseConfig(file string, data []byte) (*Config, ConfigErrors) {
	c := &Config{File: file, pos: map[string]int{}}
	d := &decoder{file: file, base: filepath.Dir(file), pos: c.pos}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		msg := strings.TrimPrefix(err.Error(), "yaml: ")
		line := 0
		if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
			line, _ = strconv.Atoi(m[1])
			msg = msg[len(m[0]):]
		}
		return nil, ConfigErrors{{File: file, Line: line, Msg: msg}}
	}
	if len(doc.Content) > 0 {
		root := doc.Content[0]
		if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
			// An empty or comments-only file is the built-in configuration.
		} else {
			d.decode(root, reflect.ValueOf(c).Elem(), "")
		}
	}
	c.inlineSecrets = d.inline
	c.resolvePaths()
	c.applyDefaults()
	return c, d.errs
}

var yamlLineRE = regexp.MustCompile(`^line (\d+): `)

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

// fieldByPath finds a struct field by its dotted yaml path.
func fieldByPath(v reflect.Value, path string) reflect.Value {
	for _, name := range strings.Split(path, ".") {
		for v.Kind() == reflect.Pointer {
			if v.IsNil() {
				return reflect.Value{}
			}
			v = v.Elem()
		}
		if v.Kind() != reflect.Struct {
			return reflect.Value{}
		}
		i, ok := yamlField(v.Type(), name)
		if !ok {
			return reflect.Value{}
		}
		v = v.Field(i)
	}
	return v
}

func yamlField(t reflect.Type, name string) (int, bool) {
	for i := range t.NumField() {
		if !t.Field(i).IsExported() {
			continue
		}
		if tag := strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0]; tag == name && tag != "" && tag != "-" {
			return i, true
		}
	}
	return 0, false
}

func yamlFieldNames(t reflect.Type) []string {
	var s []string
	for i := range t.NumField() {
		if tag := strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0]; tag != "" && tag != "-" {
			s = append(s, tag)
		}
	}
	return s
}

// setScalar parses s into a scalar field.
func setScalar(f reflect.Value, s string) error {
	if p, ok := f.Addr().Interface().(scalarParser); ok {
		return p.parseScalar(s)
	}
	switch f.Kind() {
	case reflect.String:
		f.SetString(s)
	case reflect.Int, reflect.Int64:
		n, err := strconv.ParseInt(strings.ReplaceAll(s, "_", ""), 10, 64)
		if err != nil {
			return fmt.Errorf("want an integer, got %q", s)
		}
		f.SetInt(n)
	case reflect.Bool:
		b, err := strconv.ParseBool(s)
		if err != nil {
			return fmt.Errorf("want true or false, got %q", s)
		}
		f.SetBool(b)
	default:
		return fmt.Errorf("unsupported field type %s", f.Type())
	}
	return nil
}

// decoder is the strict YAML decoder: it walks the node tree itself so that
// it can report every problem (not only the first) with its line and field.
type decoder struct {
	file   string
	base   string // directory for relative file: secrets
	pos    map[string]int
	errs   ConfigErrors
	inline []string // secret fields given in clear
}

func (d *decoder) errorf(n *yaml.Node, path, format string, args ...any) {
	d.errs = append(d.errs, Problem{File: d.file, Line: n.Line, Field: path, Msg: fmt.Sprintf(format, args...)})
}

var secretType = reflect.TypeFor[Secret]()

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	}
	switch n.Tag {
	case "!!int":
		return "an integer"
	case "!!float":
		return "a number"
	case "!!bool":
		return "a boolean"
	case "!!str":
		return "a string"
	}
	return "a " + strings.TrimPrefix(n.Tag, "!!")
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func (d *decoder) decode(n *yaml.Node, v reflect.Value, path string) {
	for n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // leaves the zero value; a default may fill it
	}
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		d.decode(n, v.Elem(), path)
	case reflect.Struct:
		if _, ok := v.Addr().Interface().(scalarParser); ok {
			d.scalar(n, v, path)
			return
		}
		if n.Kind != yaml.MappingNode {
			d.errorf(n, path, "want a mapping, got %s", kindName(n))
			return
		}
		d.mapping(n, path, func(key string, kn, vn *yaml.Node) {
			i, ok := yamlField(v.Type(), key)
			if !ok {
				d.errorf(kn, join(path, key), "unknown field (known: %s)", strings.Join(yamlFieldNames(v.Type()), ", "))
				return
			}
			d.decode(vn, v.Field(i), join(path, key))
		})
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			d.errorf(n, path, "want a mapping, got %s", kindName(n))
			return
		}
		if v.IsNil() {
			v.Set(reflect.MakeMap(v.Type()))
		}
		d.mapping(n, path, func(key string, kn, vn *yaml.Node) {
			e := reflect.New(v.Type().Elem()).Elem()
			d.decode(vn, e, join(path, key))
			v.SetMapIndex(reflect.ValueOf(key), e)
		})
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			d.errorf(n, path, "want a list, got %s", kindName(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, en := range n.Content {
			ep := fmt.Sprintf("%s[%d]", path, i)
			d.pos[ep] = en.Line
			d.decode(en, s.Index(i), ep)
		}
		v.Set(s)
	default:
		d.scalar(n, v, path)
	}
}

// mapping walks a mapping's pairs, recording positions and refusing
// duplicate and non-string keys.
func (d *decoder) mapping(n *yaml.Node, path string, each func(key string, kn, vn *yaml.Node)) {
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		kn, vn := n.Content[i], n.Content[i+1]
		if kn.Kind != yaml.ScalarNode || kn.Tag == "!!merge" {
			d.errorf(kn, path, "keys must be plain strings (no merge keys or complex keys)")
			continue
		}
		key := kn.Value
		if first, dup := seen[key]; dup {
			d.errorf(kn, join(path, key), "duplicate key (first at line %d)", first)
			continue
		}
		seen[key] = kn.Line
		d.pos[join(path, key)] = kn.Line
		each(key, kn, vn)
	}
}

func (d *decoder) scalar(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind != yaml.ScalarNode {
		d.errorf(n, path, "want %s, got %s", wantName(v), kindName(n))
		return
	}
	s, expanded, err := expandEnv(n.Value)
	if err != nil {
		d.errorf(n, path, "%v", err)
		return
	}
	// Strict types: a quoted "42" is a string, not an integer, unless it
	// came from the environment (where everything is a string).
	if !expanded && n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0 && v.Kind() != reflect.String {
		if _, ok := v.Addr().Interface().(scalarParser); !ok {
			d.errorf(n, path, "want %s, got a string", wantName(v))
			return
		}
	}
	if v.Type() == secretType {
		f, ok := strings.CutPrefix(s, "file:")
		if !ok && !expanded && s != "" {
			d.inline = append(d.inline, path)
		}
		if ok {
			if !filepath.IsAbs(f) {
				f = filepath.Join(d.base, f)
			}
			b, err := readSecretFile(f)
			if err != nil {
				d.errorf(n, path, "reading secret file: %v", unwrapPathErr(err))
				return
			}
			s = strings.TrimRight(string(b), "\r\n")
		}
	}
	if err := setScalar(v, s); err != nil {
		d.errorf(n, path, "%v", err)
	}
}

// readSecretFile reads a small regular file (a mounted secret); devices and
// pipes are refused so that a typo cannot block start-up.
func readSecretFile(path string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	if st.Size() > 1<<20 {
		return nil, fmt.Errorf("%s: larger than 1MiB", path)
	}
	return os.ReadFile(path)
}

func unwrapPathErr(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Path, pe.Err)
	}
	return err
}

func wantName(v reflect.Value) string {
	switch v.Interface().(type) {
	case Duration:
		return "a duration"
	case ByteSize:
		return "a size"
	}
	switch v.Kind() {
	case reflect.Int, reflect.Int64:
		return "an integer"
	case reflect.Bool:
		return "a boolean"
	case reflect.Slice:
		return "a list"
	case reflect.Map, reflect.Struct:
		return "a mapping"
	}
	return "a string"
}

var envRE = regexp.MustCompile(`\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}`)

// expandEnv replaces ${NAME} (error when NAME is unset) and ${NAME:-default};
// $$ is a literal $. It reports whether any reference was expanded.
func expandEnv(s string) (string, bool, error) {
	if !strings.Contains(s, "$") {
		return s, false, nil
	}
	var err error
	expanded := false
	out := envRE.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		expanded = true
		sm := envRE.FindStringSubmatch(m)
		if v, ok := os.LookupEnv(sm[1]); ok {
			return v
		}
		if sm[2] != "" {
			return sm[3]
		}
		if err == nil {
			err = fmt.Errorf("environment variable %s is not set", sm[1])
		}
		return ""
	})
	if err == nil && strings.Contains(envRE.ReplaceAllString(s, ""), "${") {
		err = fmt.Errorf("malformed ${...} reference in %q (want ${NAME} or ${NAME:-default})", redactRefs(s))
	}
	return out, expanded, err
}

func redactRefs(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

var (
	brokerNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)
	bucketRE     = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
)

// Validate checks every field and returns ConfigErrors listing every
// problem, or nil. It reads nothing but the TLS and creds files it checks
// for readability; rule cross-checks are in CheckRules.
func (c *Config) Validate() error {
	var errs ConfigErrors
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

	pl := c.Pipeline
	positive := func(field string, v int) {
		if v < 1 {
			bad(field, "must be positive, got %d", v)
		}
	}
	positive("pipeline.maxInFlight", pl.MaxInFlight)
	if pl.Workers < 0 {
		bad("pipeline.workers", "must not be negative (0: automatic), got %d", pl.Workers)
	}
	if pl.Lanes < 0 {
		bad("pipeline.lanes", "must not be negative (0: automatic), got %d", pl.Lanes)
	}
	positive("pipeline.fetchBatch", pl.FetchBatch)
	positive("pipeline.maxHops", pl.MaxHops)
	positive("pipeline.maxHeld", pl.MaxHeld)
	if pl.MaxInFlight > 1_000_000 {
		bad("pipeline.maxInFlight", "must be at most 1000000, got %d", pl.MaxInFlight)
	}
	minDur := func(field string, v Duration, lo time.Duration) {
		if v.D() < lo {
			bad(field, "must be at least %s, got %s", lo, v)
		}
	}
	minDur("pipeline.holdDelay", pl.HoldDelay, 10*time.Millisecond)
	minDur("pipeline.retry.initial", pl.Retry.Initial, time.Millisecond)
	minDur("pipeline.retry.max", pl.Retry.Max, time.Millisecond)
	if pl.Retry.Initial > pl.Retry.Max {
		bad("pipeline.retry.initial", "must not exceed pipeline.retry.max (%s), got %s", pl.Retry.Max, pl.Retry.Initial)
	}
	minDur("pipeline.drainTimeout", pl.DrainTimeout, time.Millisecond)
	minDur("pipeline.heldRecheck", pl.HeldRecheck, 10*time.Millisecond)
	minDur("pipeline.progressTimeout", pl.ProgressTimeout, time.Second)
	minDur("pipeline.ackWait", pl.AckWait, time.Second)
	if pl.MaxMessageBytes < 1 || pl.MaxMessageBytes > 64<<20 {
		bad("pipeline.maxMessageBytes", "must be between 1 byte and 64MiB, got %d", pl.MaxMessageBytes)
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
		bad(p+".nameservers", "required for type rocketmq (a list of host:port)")
	}
	for i, ns := range b.Nameservers {
		host, port, err := net.SplitHostPort(ns)
		n, perr := strconv.Atoi(port)
		if err != nil || host == "" || perr != nil || n < 1 || n > 65535 {
			bad(fmt.Sprintf("%s.nameservers[%d]", p, i), "want host:port, got %q", ns)
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
// files (where the broker is named) and listed all at once as ConfigErrors.
func (c *Config) CheckRules(t *router.Table) error {
	var errs ConfigErrors
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
