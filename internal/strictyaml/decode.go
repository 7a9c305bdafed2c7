package strictyaml

import (
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"

	"gopkg.in/yaml.v3"
)

// Default limits of Decode, used where Options leaves a limit at 0.
const (
	// DefaultMaxNodes bounds the nodes (keys and values) one Decode call
	// visits, counting an aliased node again at every alias. Every value has
	// at most one key, so this admits any document of 200,000 values.
	DefaultMaxNodes = 400000
	// DefaultMaxDepth bounds the nesting of the values decoded. Schemas are a
	// few levels deep; only a recursive schema type could reach it.
	DefaultMaxDepth = 64
	// DefaultMaxProblems bounds the problems one Decode call reports: an
	// aliased mapping full of unknown fields would otherwise turn a few
	// kilobytes into millions of problems.
	DefaultMaxProblems = 1000
)

// Options tunes Decode. The zero value is the strict default.
type Options struct {
	MaxNodes    int // 0: DefaultMaxNodes
	MaxDepth    int // 0: DefaultMaxDepth
	MaxProblems int // 0: DefaultMaxProblems

	// NullIsZero makes a null value (`key:` or `key: ~`) leave any field as
	// it is, so that a default can fill it later: such a field counts as
	// not written (Positions.Present is false, Positions.Line still finds
	// the null's line). Without it, null leaves pointers, slices and maps as
	// they are and is refused for every other type. Either way a null
	// pointer, slice or map is present: nil is its value.
	NullIsZero bool

	// Scalar, if set, is called for every scalar value before it is stored
	// (see ScalarFunc).
	Scalar ScalarFunc
}

// ScalarParser is implemented (on the pointer) by field types that parse
// their own text, such as durations and sizes. ParseScalar gets the scalar's
// text whatever its YAML tag (`5s`, `"5s"` and `512` alike); its error
// message is reported as the problem's message, so it should read like
// `must be a duration like 5s, not "5"`.
type ScalarParser interface {
	ParseScalar(text string) error
}

// Union is implemented (on the pointer) by field types that take one of
// several shapes, such as `cells: all`, `cells: [a, b]` and
// `cells: {city: hz}`. UnionTarget returns where a value of the node's kind
// (yaml.ScalarNode, yaml.SequenceNode or yaml.MappingNode) is decoded, a
// non-nil pointer to a type Decode supports, or nil when the type takes no
// value of that kind; the problem then reads "must be <UnionWant()>, not
// <what was written>". The value is decoded at the field's own path, so its
// problems and positions read as if the field had that type.
type Union interface {
	UnionTarget(kind yaml.Kind) any
	UnionWant() string
}

// Scalar describes a scalar value about to be stored; see ScalarFunc.
type Scalar struct {
	Path string       // field path, e.g. "brokers.nats.password"
	Node *yaml.Node   // the scalar node, aliases resolved
	Type reflect.Type // the type of the field (a pointer's element type)
}

// ScalarFunc rewrites a scalar's text before it is stored. It returns the
// text to store and whether that text was substituted, that is, taken from
// outside the document (an environment variable, a file): a substituted text
// is parsed from its characters, so that an integer field takes "12" from
// ${WORKERS}, while the text of a document is held to its YAML tag, so that
// a quoted "12" stays a string and is refused for an integer. A non-nil
// error is reported as the field's problem and the field is left unchanged.
// The function is not called for null values, nor for mappings or lists.
type ScalarFunc func(s Scalar) (text string, substituted bool, err error)

// Positions maps each field path decoded (such as "pins[3].cell") to the
// line it was written on: the key's line for a field or map entry, the
// element's line for a list element. A path is present even when its value
// was null or had the wrong type, so that "written but wrong" and "not
// written" stay distinguishable after decoding; except a null that
// Options.NullIsZero leaves to a default, which is kept with its line
// negated: not present, but Line finds it. Read it with Present and Line.
type Positions map[string]int

// Present reports whether path was written in the document (a null left
// to a default by Options.NullIsZero was not).
func (p Positions) Present(path string) bool { l, ok := p[path]; return ok && l >= 0 }

// Line returns the line of path or, if it was not written, of its nearest
// parent that was; 0 when none was.
func (p Positions) Line(path string) int {
	for path != "" {
		if l, ok := p[path]; ok {
			return max(l, -l)
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return 0
}

// Decode decodes the YAML node tree root into v, which must be a non-nil
// pointer, and reports every problem instead of stopping at the first:
// values of the wrong type, unknown fields (with the known ones), duplicate
// keys, keys that are not strings, merge keys (`<<`), and documents whose
// expansion of aliases or nesting exceeds the limits of opts. Each problem
// names file, the line and the field path. It returns the line of every
// field path decoded.
//
// Targets are structs (fields by their `yaml` tag; untagged, unexported and
// `yaml:"-"` fields are not decoded), maps with string keys, slices,
// pointers, strings, signed integers, booleans and types implementing
// ScalarParser. The rules by YAML tag: a string field takes a string or an
// unquoted integer, verbatim (`key: 2088000000000042`); an integer field an
// integer (decimal, 0x, 0o, 0b, `_` separators); a bool field true or false.
// Other target types panic: schemas are fixed at compile time, and decoding
// any document into one in a test finds them.
//
// A field keeps its value when its value has a problem; slices are
// replaced, maps are added to, pointers are allocated only when nil.
// Problems are returned in the order found (see Errors.Sort).
func Decode(file string, root *yaml.Node, v any, opts Options) (Positions, Errors) {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() {
		panic(fmt.Sprintf("strictyaml: Decode needs a non-nil pointer, not %T", v))
	}
	d := newDecoder(file, opts)
	d.value(root, rv.Elem(), "", 0, 0)
	return d.pos, d.errs
}

func newDecoder(file string, opts Options) *decoder {
	return &decoder{
		file:        file,
		opts:        opts,
		maxNodes:    orDefault(opts.MaxNodes, DefaultMaxNodes),
		maxDepth:    orDefault(opts.MaxDepth, DefaultMaxDepth),
		maxProblems: orDefault(opts.MaxProblems, DefaultMaxProblems),
		pos:         Positions{},
	}
}

func orDefault(v, def int) int {
	if v > 0 {
		return v
	}
	return def
}

type decoder struct {
	file                            string
	opts                            Options
	maxNodes, maxDepth, maxProblems int
	pos                             Positions
	errs                            Errors
	nodes                           int
	stopped                         bool // a limit was reached: nothing more is decoded or reported
}

func (d *decoder) errorf(line int, path, format string, a ...any) {
	if d.stopped {
		return
	}
	if len(d.errs) == d.maxProblems {
		d.errs.Addf(d.file, line, path, "too many problems (more than %d); the rest of the document was not checked", d.maxProblems)
		d.stopped = true
		return
	}
	d.errs.Addf(d.file, line, path, format, a...)
}

// visit counts a node against the budget and reports whether to go on.
func (d *decoder) visit(line int, path string) bool {
	if d.stopped {
		return false
	}
	if d.nodes++; d.nodes > d.maxNodes {
		// Not through errorf: the reason to stop must be reported even
		// when the problem cap is reached at the same node.
		d.errs.Addf(d.file, line, path, "document too large (more than %d keys and values after expanding aliases)", d.maxNodes)
		d.stopped = true
		return false
	}
	return true
}

// value decodes n into v. keyLine is the line recorded for path (the key's
// line for a field, 0 to use the node's own line).
func (d *decoder) value(n *yaml.Node, v reflect.Value, path string, keyLine, depth int) {
	at := n.Line // where the value is written, also when it is an alias
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if !d.visit(at, path) {
		return
	}
	if path != "" {
		if keyLine == 0 {
			keyLine = at
		}
		d.pos[path] = keyLine
	}
	if depth > d.maxDepth {
		d.errorf(at, path, "nested too deeply (more than %d levels)", d.maxDepth)
		return
	}
	if isNull(n) {
		switch v.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Map:
			// A nil pointer is how a schema says "optional"; `pins:` with
			// every entry commented out means none.
			return
		}
		if d.opts.NullIsZero {
			// As if not written: a default fills the field (Present
			// false), and a problem about it still finds its line.
			if path != "" {
				d.pos[path] = -keyLine
			}
			return
		}
	}
	for v.Kind() == reflect.Pointer {
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		v = v.Elem()
	}
	if p, ok := v.Addr().Interface().(ScalarParser); ok {
		d.scalar(n, at, v, path, p)
		return
	}
	if u, ok := v.Addr().Interface().(Union); ok {
		target := u.UnionTarget(n.Kind)
		if target == nil {
			d.errorf(at, path, "must be %s, not %s", u.UnionWant(), Describe(n))
			return
		}
		d.value(n, reflect.ValueOf(target).Elem(), path, keyLine, depth+1)
		return
	}
	switch v.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			d.errorf(at, path, "must be a mapping, not %s", Describe(n))
			return
		}
		fields := fieldsOf(v.Type())
		d.mapping(n, path, func(key string, kn, vn *yaml.Node) {
			i, ok := fields.byName[key]
			if !ok {
				d.errorf(kn.Line, join(path, key), "unknown field (known: %s)", fields.known)
				return
			}
			d.value(vn, v.Field(i), join(path, key), kn.Line, depth+1)
		})
	case reflect.Map:
		t := v.Type()
		if t.Key().Kind() != reflect.String {
			panic("strictyaml: unsupported map key type " + t.Key().String() + " in " + t.String())
		}
		if n.Kind != yaml.MappingNode {
			d.errorf(at, path, "must be a mapping, not %s", Describe(n))
			return
		}
		if v.IsNil() {
			v.Set(reflect.MakeMap(t))
		}
		d.mapping(n, path, func(key string, kn, vn *yaml.Node) {
			e := reflect.New(t.Elem()).Elem()
			d.value(vn, e, join(path, key), kn.Line, depth+1)
			v.SetMapIndex(reflect.ValueOf(key).Convert(t.Key()), e)
		})
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			d.errorf(at, path, "must be a list, not %s", Describe(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, c := range n.Content {
			d.value(c, s.Index(i), path+"["+strconv.Itoa(i)+"]", 0, depth+1)
		}
		v.Set(s)
	default:
		d.scalar(n, at, v, path, nil)
	}
}

// mapping calls each for every pair of n with a plain string key, counting
// keys against the budget and refusing duplicates, merge keys and keys that
// are not strings.
func (d *decoder) mapping(n *yaml.Node, path string, each func(key string, kn, vn *yaml.Node)) {
	seen := make(map[string]int, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		kn, vn := n.Content[i], n.Content[i+1]
		if !d.visit(kn.Line, path) {
			return
		}
		if kn.Kind != yaml.ScalarNode {
			d.errorf(kn.Line, path, "mapping key must be a string, not %s", Describe(kn))
			continue
		}
		if kn.ShortTag() == "!!merge" {
			d.errorf(kn.Line, path, "merge keys (<<) are not supported: write the fields out")
			continue
		}
		if first, dup := seen[kn.Value]; dup {
			d.errorf(kn.Line, join(path, kn.Value), "duplicate key (first at line %d)", first)
			continue
		}
		seen[kn.Value] = kn.Line
		each(kn.Value, kn, vn)
	}
}

// scalar stores a scalar node into v; p is v's ScalarParser, if it has one.
func (d *decoder) scalar(n *yaml.Node, at int, v reflect.Value, path string, p ScalarParser) {
	if p == nil && !scalarKinds[v.Kind()] {
		panic("strictyaml: unsupported field type " + v.Type().String() + " at " + path)
	}
	if n.Kind != yaml.ScalarNode || isNull(n) {
		d.errorf(at, path, "must be %s, not %s", want(v, p), Describe(n))
		return
	}
	text, substituted := n.Value, false
	if d.opts.Scalar != nil {
		var err error
		text, substituted, err = d.opts.Scalar(Scalar{Path: path, Node: n, Type: v.Type()})
		if err != nil {
			d.errorf(at, path, "%v", err)
			return
		}
	}
	if p != nil {
		if err := p.ParseScalar(text); err != nil {
			d.errorf(at, path, "%v", err)
		}
		return
	}
	// The document's own text is judged by its YAML tag; a substituted text
	// by its characters alone.
	tag, what := n.ShortTag(), Describe(n)
	if substituted {
		tag, what = "", fmt.Sprintf("the string %q", text)
	}
	mismatch := func() { d.errorf(at, path, "must be %s, not %s", want(v, nil), what) }
	switch v.Kind() {
	case reflect.String:
		if !substituted && tag != "!!str" && tag != "!!int" {
			mismatch()
			return
		}
		v.SetString(text)
	case reflect.Bool:
		b, ok := yamlBool(text)
		if !ok || (!substituted && tag != "!!bool") {
			mismatch()
			return
		}
		v.SetBool(b)
	default: // the integer kinds
		if !substituted && tag != "!!int" {
			mismatch()
			return
		}
		i, err := strconv.ParseInt(strings.ReplaceAll(text, "_", ""), 0, 64)
		if err != nil && substituted && !errors.Is(err, strconv.ErrRange) {
			mismatch()
			return
		}
		if err != nil || v.OverflowInt(i) {
			d.errorf(at, path, "integer %s out of range", text)
			return
		}
		v.SetInt(i)
	}
}

// scalarKinds are the kinds scalar stores without a ScalarParser.
var scalarKinds = map[reflect.Kind]bool{
	reflect.String: true, reflect.Bool: true,
	reflect.Int: true, reflect.Int8: true, reflect.Int16: true, reflect.Int32: true, reflect.Int64: true,
}

// yamlBool parses the booleans of the YAML core schema.
func yamlBool(s string) (value, ok bool) {
	switch s {
	case "true", "True", "TRUE":
		return true, true
	case "false", "False", "FALSE":
		return false, true
	}
	return false, false
}

// want names what a field of v's type takes, for "must be X, not Y".
func want(v reflect.Value, p ScalarParser) string {
	if p != nil {
		return "a single value"
	}
	switch v.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Struct, reflect.Map:
		return "a mapping"
	case reflect.Slice:
		return "a list"
	}
	return "an integer"
}

// Describe names a node's value for messages: "a mapping", "a list",
// "null", `the string "x"`, "the integer 3", "the boolean true",
// "the number 1.5", "an alias", or the value with its tag.
func Describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		switch tag := n.ShortTag(); tag {
		case "!!null":
			return "null"
		case "!!str":
			return fmt.Sprintf("the string %q", n.Value)
		case "!!int":
			return "the integer " + n.Value
		case "!!bool":
			return "the boolean " + n.Value
		case "!!float":
			return "the number " + n.Value
		default:
			return fmt.Sprintf("%q (%s)", n.Value, strings.TrimPrefix(tag, "!!"))
		}
	}
	return "an unexpected node"
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" }

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

type fieldSet struct {
	byName map[string]int
	known  string // the field names in declaration order, comma separated
}

var fieldSets sync.Map // reflect.Type → fieldSet

// fieldsOf returns the decoded fields of struct type t.
func fieldsOf(t reflect.Type) fieldSet {
	if fs, ok := fieldSets.Load(t); ok {
		return fs.(fieldSet)
	}
	fs := fieldSet{byName: map[string]int{}}
	var names []string
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "" || name == "-" || !f.IsExported() {
			continue
		}
		fs.byName[name] = i
		names = append(names, name)
	}
	fs.known = strings.Join(names, ", ")
	fieldSets.Store(t, fs)
	return fs
}
