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
)

// The strict decoder of the configuration file. yaml.v3's own decoder stops
// at the first error and forgets lines; this one walks the node tree so that
// every problem is reported with its line and field path, and so that
// environment references and file: secrets are resolved per field.

// parse decodes what it can: it returns the config (nil only when data is
// not YAML at all) and the decoding problems. template leaves ${...} and
// file: references as written.
func parse(file string, data []byte, template bool) (*Config, Errors) {
	c := &Config{File: file, pos: map[string]int{}}
	d := &decoder{file: file, base: filepath.Dir(file), pos: c.pos, template: template}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		msg := strings.TrimPrefix(err.Error(), "yaml: ")
		line := 0
		if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
			line, _ = strconv.Atoi(m[1])
			msg = msg[len(m[0]):]
		}
		return nil, Errors{{File: file, Line: line, Msg: msg}}
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
	c.applyDefaults()
	return c, d.errs
}

var yamlLineRE = regexp.MustCompile(`^line (\d+): `)

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
	file     string
	base     string // directory of relative paths and file: secrets
	template bool   // leave ${...} and file: as written
	pos      map[string]int
	errs     Errors
	inline   []string // secret fields given in clear
}

func (d *decoder) errorf(n *yaml.Node, path, format string, args ...any) {
	d.errs = append(d.errs, Problem{File: d.file, Line: n.Line, Field: path, Msg: fmt.Sprintf(format, args...)})
}

var (
	secretType = reflect.TypeFor[Secret]()
	pathType   = reflect.TypeFor[Path]()
	brokerType = reflect.TypeFor[Broker]()
)

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
		if v.Type() == brokerType {
			d.broker(n, v.Addr().Interface().(*Broker), path)
			return
		}
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
	s, expanded, err := n.Value, false, error(nil)
	if d.template {
		expanded = strings.Contains(s, "${") // a reference, as written
	} else if s, expanded, err = expandEnv(n.Value); err != nil {
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
		if ok && !d.template {
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
	if v.Type() == pathType && s != "" && !filepath.IsAbs(s) && d.file != "" {
		s = filepath.Join(d.base, s)
	}
	if err := setScalar(v, s); err != nil {
		d.errorf(n, path, "%v", err)
	}
}

// broker decodes one broker: its type selects the kind whose settings struct
// the other fields decode into. Fields of another kind are named as such;
// with a missing or unknown type only the type is reported (by Validate).
func (d *decoder) broker(n *yaml.Node, b *Broker, path string) {
	if n.Kind != yaml.MappingNode {
		d.errorf(n, path, "want a mapping, got %s", kindName(n))
		return
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if kn := n.Content[i]; kn.Kind == yaml.ScalarNode && kn.Value == "type" {
			d.decode(n.Content[i+1], reflect.ValueOf(&b.Type).Elem(), join(path, "type"))
		}
	}
	k, ok := brokerKindOf(b.Type)
	if ok {
		b.Settings = k.NewSettings()
	}
	d.mapping(n, path, func(key string, kn, vn *yaml.Node) {
		if key == "type" || !ok {
			return
		}
		v := reflect.ValueOf(b.Settings).Elem()
		i, found := yamlField(v.Type(), key)
		if !found {
			if others := otherKindsField(b.Type, key); len(others) > 0 {
				d.errorf(kn, join(path, key), "only valid for type %s", strings.Join(others, ", "))
			} else {
				d.errorf(kn, join(path, key), "unknown field (known: type, %s)", strings.Join(yamlFieldNames(v.Type()), ", "))
			}
			return
		}
		d.decode(vn, v.Field(i), join(path, key))
	})
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
