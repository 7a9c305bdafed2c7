package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// The configuration file is decoded by internal/strictyaml, the walker the
// rule files use too: every problem is reported with its line and field path,
// alias expansion and nesting are bounded. What is the configuration's own:
// the scalar hook (${ENV} references, file: secrets, paths relative to the
// file, the inline-secret warning) and the brokers, whose fields depend on
// their type: the decoder reads each broker's type first and decodes the
// document into a schema that gives every broker its kind's settings.

// parse decodes what it can: it returns the config (nil only when data is
// not YAML at all) and the decoding problems. template leaves ${...} and
// file: references as written.
func parse(file string, data []byte, template bool) (*Config, Errors) {
	c := &Config{File: file, pos: strictyaml.Positions{}}
	roots, errs := strictyaml.Documents(file, data)
	if len(errs) > 0 {
		return nil, errs // not YAML
	}
	h := &scalarHook{base: filepath.Dir(file), template: template, resolvePaths: file != ""}
	if len(roots) > 0 {
		root := roots[0]
		for _, extra := range roots[1:] {
			errs.Addf(file, extra.Line, "", "a configuration file holds one YAML document; this is another")
		}
		s := newSchema(root, h)
		doc := reflect.New(s.doc)
		pos, probs := strictyaml.Decode(file, root, doc.Interface(), strictyaml.Options{NullIsZero: true, Scalar: h.scalar})
		c.pos = pos
		s.fill(c, doc.Elem())
		errs = append(errs, s.fixProblems(file, probs)...)
	}
	c.inlineSecrets = h.inline
	c.applyDefaults()
	return c, errs
}

// scalarHook resolves each scalar before it is stored: ${NAME} references
// (unless template), file: secrets, relative paths; and it records the
// secrets written in clear.
type scalarHook struct {
	base         string // directory of relative paths and file: secrets
	template     bool   // leave ${...} and file: as written
	resolvePaths bool
	inline       []string // secret fields given in clear
}

var (
	secretType = reflect.TypeFor[Secret]()
	pathType   = reflect.TypeFor[Path]()
)

func (h *scalarHook) scalar(s strictyaml.Scalar) (string, bool, error) {
	text, expanded, err := h.expand(s.Node.Value)
	if err != nil {
		return "", false, err
	}
	switch s.Type {
	case secretType:
		f, ok := strings.CutPrefix(text, "file:")
		if !ok && !expanded && text != "" {
			h.inline = append(h.inline, s.Path)
		}
		if ok && !h.template {
			if !filepath.IsAbs(f) {
				f = filepath.Join(h.base, f)
			}
			b, err := readSecretFile(f)
			if err != nil {
				return "", false, fmt.Errorf("reading secret file: %v", unwrapPathErr(err))
			}
			return strings.TrimRight(string(b), "\r\n"), true, nil
		}
	case pathType:
		if text != "" && !filepath.IsAbs(text) && h.resolvePaths {
			text = filepath.Join(h.base, text)
		}
	}
	return text, expanded, nil
}

// expand expands ${...} references; a template keeps them, and a value that
// holds one counts as coming from outside the file.
func (h *scalarHook) expand(s string) (string, bool, error) {
	if h.template {
		return s, strings.Contains(s, "${"), nil
	}
	return expandEnv(s)
}

// schema is the struct type one document decodes into: Config's fields,
// with brokers replaced by a struct that has one field per broker of the
// document, typed by the broker's kind.
type schema struct {
	doc     reflect.Type
	fields  []int // index in Config of each field of doc
	brokers int   // index in doc of the brokers field; -1 when Config has none
	entries []brokerEntry
	byName  map[string]int // index in entries
	// beyond lists the brokers beyond maxBrokers, which are not decoded.
	beyond map[string]bool
	line   int // of the first of them
}

// maxBrokers bounds the brokers of a configuration: the decoder builds a
// schema field per broker, and a bridge has a handful.
const maxBrokers = 1000

// brokerEntry is one broker of the document as the schema sees it.
type brokerEntry struct {
	name  string
	kind  *BrokerKind // nil: type missing or unknown
	entry reflect.Type
}

// brokerTypeField is the Go name of the `type` field of a broker's entry;
// the kind's settings fields follow it in their order.
const brokerTypeField = "BrokerType"

func newSchema(root *yaml.Node, h *scalarHook) *schema {
	s := &schema{brokers: -1, byName: map[string]int{}, beyond: map[string]bool{}}
	ct := reflect.TypeFor[Config]()
	var fields []reflect.StructField
	for i := range ct.NumField() {
		f := ct.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if !f.IsExported() || name == "" || name == "-" {
			continue
		}
		if name == "brokers" {
			s.brokers = len(fields)
			f.Type = s.brokersType(mappingValue(root, "brokers"), h)
		}
		s.fields = append(s.fields, i)
		fields = append(fields, reflect.StructField{Name: f.Name, Type: f.Type, Tag: f.Tag})
	}
	s.doc = reflect.StructOf(fields)
	return s
}

// brokersType returns a struct type with a field (a pointer, so that an
// empty broker stays nil) for every broker written under n.
func (s *schema) brokersType(n *yaml.Node, h *scalarHook) reflect.Type {
	var fields []reflect.StructField
	budget := strictyaml.DefaultMaxNodes // bounds the look-ahead of an aliased document
	for i := 0; n != nil && i+1 < len(n.Content); i += 2 {
		kn := n.Content[i]
		name := kn.Value
		if _, dup := s.byName[name]; dup || kn.Kind != yaml.ScalarNode || name == "" || name == "-" || strings.Contains(name, ",") {
			continue // reported by the decoder (not a string, a duplicate) or as an unknown field
		}
		if len(s.entries) == maxBrokers {
			if len(s.beyond) == 0 {
				s.line = kn.Line
			}
			s.beyond[name] = true
			continue
		}
		e := brokerEntry{name: name}
		if typ, ok := peekType(n.Content[i+1], h, &budget); ok {
			if k, ok := brokerKindOf(typ); ok {
				e.kind = &k
			}
		}
		e.entry = entryType(e.kind)
		s.byName[name] = len(s.entries)
		s.entries = append(s.entries, e)
		fields = append(fields, reflect.StructField{
			Name: fmt.Sprintf("B%d", len(fields)),
			Type: reflect.PointerTo(e.entry),
			Tag:  reflect.StructTag("yaml:" + strconv.Quote(name)),
		})
	}
	return reflect.StructOf(fields)
}

// entryType is the struct a broker of kind k decodes into: its type, then
// the kind's settings fields; with no kind, its type alone.
func entryType(k *BrokerKind) reflect.Type {
	fields := []reflect.StructField{{Name: brokerTypeField, Type: reflect.TypeFor[string](), Tag: `yaml:"type"`}}
	if k != nil {
		st := reflect.TypeOf(k.NewSettings()).Elem()
		for _, i := range settingsFields(st) {
			f := st.Field(i)
			fields = append(fields, reflect.StructField{Name: f.Name, Type: f.Type, Tag: f.Tag})
		}
	}
	return reflect.StructOf(fields)
}

// settingsFields returns the indexes of the decoded fields of a settings
// struct type: exported, with a yaml tag.
func settingsFields(t reflect.Type) []int {
	var out []int
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if f.IsExported() && name != "" && name != "-" {
			out = append(out, i)
		}
	}
	return out
}

// fill copies the decoded document into c.
func (s *schema) fill(c *Config, doc reflect.Value) {
	cv := reflect.ValueOf(c).Elem()
	for j, i := range s.fields {
		if j != s.brokers {
			cv.Field(i).Set(doc.Field(j))
		}
	}
	if s.brokers < 0 || !c.pos.Present("brokers") {
		return
	}
	c.Brokers = map[string]*Broker{}
	bv := doc.Field(s.brokers)
	for i, e := range s.entries {
		ev := bv.Field(i)
		if !c.pos.Present("brokers." + e.name) {
			continue // not decoded: the document is too large
		}
		if ev.IsNil() {
			c.Brokers[e.name] = nil // `name:` alone; Validate reports it
			continue
		}
		ev = ev.Elem()
		b := &Broker{Type: ev.Field(0).String()}
		if e.kind != nil {
			b.Settings = e.kind.NewSettings()
			sv := reflect.ValueOf(b.Settings).Elem()
			for j, i := range settingsFields(sv.Type()) {
				sv.Field(i).Set(ev.Field(j + 1))
			}
		}
		c.Brokers[e.name] = b
	}
}

// fixProblems words the problems of brokers as a reader expects them: a
// field of another kind is "only valid for type X"; with a missing or
// unknown type only the type is reported (by Validate); a name the schema
// cannot hold is a bad broker name.
func (s *schema) fixProblems(file string, probs Errors) Errors {
	out := make(Errors, 0, len(probs)+1)
	if len(s.beyond) > 0 {
		out = append(out, Problem{File: file, Line: s.line, Field: "brokers",
			Msg: fmt.Sprintf("more than %d brokers; the rest were not checked", maxBrokers)})
	}
	for _, p := range probs {
		if s.beyond[strings.TrimPrefix(p.Field, "brokers.")] {
			continue
		}
		if !strings.HasPrefix(p.Msg, "unknown field") || !strings.HasPrefix(p.Field, "brokers.") {
			out = append(out, p)
			continue
		}
		e, field := s.entryOf(p.Field)
		switch {
		case e == nil && !strings.Contains(strings.TrimPrefix(p.Field, "brokers."), "."):
			p.Msg = "broker names use letters, digits, '_', '-' and '.'"
		case e == nil || e.kind == nil:
			continue
		case !strings.Contains(field, "."):
			if others := otherKindsField(e.kind.Type, field); len(others) > 0 {
				p.Msg = "only valid for type " + strings.Join(others, ", ")
			}
		}
		out = append(out, p)
	}
	return out
}

// entryOf returns the broker a field path "brokers.<name>.<field>" is in (a
// name may hold dots: the longest that matches) and the field's path
// relative to the broker.
func (s *schema) entryOf(path string) (*brokerEntry, string) {
	rest := strings.TrimPrefix(path, "brokers.")
	for i := len(rest) - 1; i > 0; i-- {
		if rest[i] != '.' {
			continue
		}
		if j, ok := s.byName[rest[:i]]; ok {
			return &s.entries[j], rest[i+1:]
		}
	}
	return nil, ""
}

// peekType returns the type a broker entry names, resolved as the decoder
// will resolve it (${ENV}), within budget pairs looked at.
func peekType(n *yaml.Node, h *scalarHook, budget *int) (string, bool) {
	n = resolve(n)
	if n == nil || n.Kind != yaml.MappingNode {
		return "", false
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if *budget--; *budget < 0 {
			return "", false
		}
		if kn := n.Content[i]; kn.Kind == yaml.ScalarNode && kn.Value == "type" {
			vn := resolve(n.Content[i+1])
			if vn == nil || vn.Kind != yaml.ScalarNode {
				return "", false
			}
			typ, _, err := h.expand(vn.Value)
			return typ, err == nil
		}
	}
	return "", false
}

// mappingValue returns the value of key in the mapping n (aliases followed).
func mappingValue(n *yaml.Node, key string) *yaml.Node {
	n = resolve(n)
	if n == nil || n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if kn := n.Content[i]; kn.Kind == yaml.ScalarNode && kn.Value == key {
			if v := resolve(n.Content[i+1]); v != nil && v.Kind == yaml.MappingNode {
				return v
			}
			return nil
		}
	}
	return nil
}

// resolve follows an alias chain to its node (nil for a dangling one).
func resolve(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
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

// yamlField returns the index of the field of struct type t tagged name.
func yamlField(t reflect.Type, name string) (int, bool) {
	for _, i := range settingsFields(t) {
		if tag, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); tag == name {
			return i, true
		}
	}
	return 0, false
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

var envRE = regexp.MustCompile(`\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}`)

// expandEnv replaces ${NAME} (error when NAME is unset; empty when it is
// set to "") and ${NAME:-default} (default when NAME is unset or empty, as
// in a shell); $$ is a literal $. It reports whether any reference was
// expanded.
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
		v, ok := os.LookupEnv(sm[1])
		switch {
		case sm[2] != "" && v == "":
			return sm[3] // unset or empty: the default
		case ok:
			return v
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
