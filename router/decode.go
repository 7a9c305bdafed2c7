package router

import (
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// The rule schema is decoded by walking yaml.Node trees instead of
// yaml.Unmarshal, because validation must report every problem at once, with
// the line and the field path of each: yaml.v3 stops at the first duplicate
// key and reports unknown fields without their path.

// problems collects validation problems of a whole directory.
type problems struct{ list []Problem }

func (p *problems) add(file string, line int, field, format string, a ...any) {
	p.list = append(p.list, Problem{File: file, Line: line, Field: field, Msg: fmt.Sprintf(format, a...)})
}

// sorted returns the problems ordered by file and line, keeping the order of
// discovery for problems on the same line.
func (p *problems) sorted() Errors {
	out := append(Errors(nil), p.list...)
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].File != out[j].File {
			return out[i].File < out[j].File
		}
		return out[i].Line < out[j].Line
	})
	return out
}

// doc is one decoded YAML document: where it is, and the line of every field
// path that was present in it (presence matters: `from: 0` differs from no
// `from`).
type doc struct {
	file  string
	line  int            // line of the document's first key
	lines map[string]int // field path → line, for every field present
	probs *problems
	// nodes bounds the work per document: aliases can make a small file
	// expand into a huge tree ("billion laughs").
	nodes int
}

const maxNodesPerDoc = 200000

// present reports whether the field path was written in the document.
func (d *doc) present(path string) bool { _, ok := d.lines[path]; return ok }

// lineOf returns the line of path, or of its nearest present parent, or of
// the document.
func (d *doc) lineOf(path string) int {
	for path != "" {
		if l, ok := d.lines[path]; ok {
			return l
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return d.line
}

// errorf records a problem at the line of path.
func (d *doc) errorf(path, format string, a ...any) {
	d.probs.add(d.file, d.lineOf(path), path, format, a...)
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

// decode fills v from n, recording problems for wrong types, unknown fields
// and duplicate keys. Supported targets: structs (fields by `yaml` tag),
// string, int, int64, bool, slices and pointers to those.
func (d *doc) decode(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if d.nodes++; d.nodes > maxNodesPerDoc {
		if d.nodes == maxNodesPerDoc+1 {
			d.errorf(path, "document too large (more than %d values after expanding aliases)", maxNodesPerDoc)
		}
		return
	}
	d.lines[path] = n.Line
	switch v.Kind() {
	case reflect.Pointer:
		if isNull(n) {
			return
		}
		nv := reflect.New(v.Type().Elem())
		d.decode(n, nv.Elem(), path)
		v.Set(nv)
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			d.errorf(path, "must be a mapping, not %s", describe(n))
			return
		}
		d.decodeStruct(n, v, path)
	case reflect.Slice:
		if isNull(n) {
			return // `pins:` with every entry commented out means none
		}
		if n.Kind != yaml.SequenceNode {
			d.errorf(path, "must be a list, not %s", describe(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, c := range n.Content {
			d.decode(c, s.Index(i), fmt.Sprintf("%s[%d]", path, i))
		}
		v.Set(s)
	case reflect.String:
		// An unquoted number is accepted as a string and taken verbatim, so
		// that `key: 2088000000000042` and `shards: [7]` mean what they say.
		if n.Kind != yaml.ScalarNode || (n.Tag != "!!str" && n.Tag != "!!int") {
			d.errorf(path, "must be a string, not %s", describe(n))
			return
		}
		v.SetString(n.Value)
	case reflect.Int, reflect.Int64:
		if n.Kind != yaml.ScalarNode || n.Tag != "!!int" {
			d.errorf(path, "must be an integer, not %s", describe(n))
			return
		}
		i, err := strconv.ParseInt(strings.ReplaceAll(n.Value, "_", ""), 0, 64)
		if err != nil || (v.Kind() == reflect.Int && int64(int(i)) != i) {
			d.errorf(path, "integer %s out of range", n.Value)
			return
		}
		v.SetInt(i)
	case reflect.Bool:
		if n.Kind != yaml.ScalarNode || n.Tag != "!!bool" {
			d.errorf(path, "must be true or false, not %s", describe(n))
			return
		}
		v.SetBool(n.Value == "true" || n.Value == "True" || n.Value == "TRUE")
	default:
		panic("router: unsupported schema type " + v.Type().String())
	}
}

func (d *doc) decodeStruct(n *yaml.Node, v reflect.Value, path string) {
	fields := schemaFields(v.Type())
	seen := make(map[string]int, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			d.probs.add(d.file, k.Line, path, "mapping key must be a string, not %s", describe(k))
			continue
		}
		fp := join(path, k.Value)
		if first, dup := seen[k.Value]; dup {
			d.probs.add(d.file, k.Line, fp, "duplicate key (first at line %d)", first)
			continue
		}
		seen[k.Value] = k.Line
		idx, ok := fields.byName[k.Value]
		if !ok {
			d.probs.add(d.file, k.Line, fp, "unknown field (known: %s)", strings.Join(fields.names, ", "))
			continue
		}
		d.decode(val, v.Field(idx), fp)
		d.lines[fp] = k.Line // the key's line reads better than the value's
	}
}

type fieldSet struct {
	byName map[string]int
	names  []string
}

func schemaFields(t reflect.Type) fieldSet {
	fs := fieldSet{byName: map[string]int{}}
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		fs.byName[name] = i
		fs.names = append(fs.names, name)
	}
	return fs
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.Tag == "!!null" }

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		switch n.Tag {
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
		}
		return fmt.Sprintf("%q (%s)", n.Value, strings.TrimPrefix(n.Tag, "!!"))
	}
	return "an unexpected node"
}

var yamlParserErrors = []string{
	"did not find expected <", "did not find expected ',' or", "did not find expected '-' indicator",
	"did not find expected key", "did not find expected node content", "found undefined tag handle",
	"found duplicate %", "found incompatible YAML document",
}

var yamlErrLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// syntaxProblem turns a yaml.v3 parse error into a located problem.
func syntaxProblem(file string, err error) Problem {
	msg := err.Error()
	if m := yamlErrLine.FindStringSubmatch(msg); m != nil {
		l, _ := strconv.Atoi(m[1])
		// yaml.v3 reports parser errors (as opposed to scanner errors) at the
		// 0-based line of the enclosing block or flow collection.
		for _, p := range yamlParserErrors {
			if strings.HasPrefix(m[2], p) {
				l++
				m[2] += " (in the collection starting on this line)"
				break
			}
		}
		return Problem{File: file, Line: l, Msg: "invalid YAML: " + m[2]}
	}
	return Problem{File: file, Msg: "invalid YAML: " + strings.TrimPrefix(msg, "yaml: ")}
}
