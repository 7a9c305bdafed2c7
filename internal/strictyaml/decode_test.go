package strictyaml

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

type item struct {
	Name string `yaml:"name"`
	N    int    `yaml:"n"`
}

// size parses its own text: "<digits>k".
type size int64

func (s *size) ParseScalar(text string) error {
	var n int64
	if _, err := fmt.Sscanf(text, "%dk", &n); err != nil {
		return fmt.Errorf("must be a size like 4k, not %q", text)
	}
	*s = size(n * 1024)
	return nil
}

type schema struct {
	S      string          `yaml:"s"`
	I      int             `yaml:"i"`
	I8     int8            `yaml:"i8"`
	B      bool            `yaml:"b"`
	L      []string        `yaml:"l"`
	LL     [][]string      `yaml:"ll"`
	M      map[string]item `yaml:"m"`
	P      *item           `yaml:"p"`
	In     item            `yaml:"in"`
	Size   size            `yaml:"size"`
	PSize  *size           `yaml:"psize"`
	Skip   string          `yaml:"-"`
	NoTag  string
	hidden string `yaml:"hidden"`
}

const known = "known: s, i, i8, b, l, ll, m, p, in, size, psize"

// root parses src as one document.
func root(t *testing.T, src string) *yaml.Node {
	t.Helper()
	roots, errs := Documents("f.yaml", []byte(src))
	if len(errs) > 0 || len(roots) != 1 {
		t.Fatalf("%q: %d documents, %v", src, len(roots), errs)
	}
	return roots[0]
}

func problemLines(errs Errors) []string {
	out := make([]string, len(errs))
	for i, p := range errs {
		out[i] = p.String()
	}
	return out
}

// TestDecodeProblems has one case per kind of problem; want is the complete
// list of problems, in the order found.
func TestDecodeProblems(t *testing.T) {
	for _, tc := range []struct {
		name string
		src  string
		opts Options
		want []string
	}{
		{"unknown field", "s: x\nsx: y\n", Options{}, []string{"f.yaml:2: sx: unknown field (" + known + ")"}},
		{"unknown nested field", "in:\n  name: a\n  nme: b\n", Options{}, []string{"f.yaml:3: in.nme: unknown field (known: name, n)"}},
		{"untagged and hidden fields are unknown", "NoTag: a\nhidden: b\nSkip: c\n", Options{}, []string{
			"f.yaml:1: NoTag: unknown field (" + known + ")",
			"f.yaml:2: hidden: unknown field (" + known + ")",
			"f.yaml:3: Skip: unknown field (" + known + ")"}},
		{"duplicate key", "s: a\ni: 1\ns: b\n", Options{}, []string{"f.yaml:3: s: duplicate key (first at line 1)"}},
		{"duplicate map key", "m:\n  a: {n: 1}\n  a: {n: 2}\n", Options{}, []string{"f.yaml:3: m.a: duplicate key (first at line 2)"}},
		{"merge key", "base: &b {name: x}\nin:\n  <<: *b\n  n: 1\n", Options{}, []string{
			"f.yaml:1: base: unknown field (" + known + ")",
			"f.yaml:3: in: merge keys (<<) are not supported: write the fields out"}},
		{"list key", "? [a, b]\n: 1\n", Options{}, []string{"f.yaml:1: mapping key must be a string, not a list"}},
		{"mapping key", "in:\n  ? {a: 1}\n  : 1\n", Options{}, []string{"f.yaml:2: in: mapping key must be a string, not a mapping"}},
		{"string not list", "s: [a]\n", Options{}, []string{"f.yaml:1: s: must be a string, not a list"}},
		{"string not bool", "s: true\n", Options{}, []string{"f.yaml:1: s: must be a string, not the boolean true"}},
		{"string not number", "s: 1.5\n", Options{}, []string{"f.yaml:1: s: must be a string, not the number 1.5"}},
		{"string not null", "s:\n", Options{}, []string{"f.yaml:1: s: must be a string, not null"}},
		{"string not timestamp", "s: 2001-12-14\n", Options{}, []string{`f.yaml:1: s: must be a string, not "2001-12-14" (timestamp)`}},
		{"integer not string", "i: \"10\"\n", Options{}, []string{`f.yaml:1: i: must be an integer, not the string "10"`}},
		{"integer not number", "i: 3.5\n", Options{}, []string{"f.yaml:1: i: must be an integer, not the number 3.5"}},
		{"integer not mapping", "i: {a: 1}\n", Options{}, []string{"f.yaml:1: i: must be an integer, not a mapping"}},
		{"integer out of range", "i8: 300\n", Options{}, []string{"f.yaml:1: i8: integer 300 out of range"}},
		{"bool not yes", "b: yes\n", Options{}, []string{`f.yaml:1: b: must be true or false, not the string "yes"`}},
		{"list not string", "l: a\n", Options{}, []string{`f.yaml:1: l: must be a list, not the string "a"`}},
		{"list element", "l:\n  - a\n  - [b]\n", Options{}, []string{"f.yaml:3: l[1]: must be a string, not a list"}},
		{"mapping not list", "in: [a]\n", Options{}, []string{"f.yaml:1: in: must be a mapping, not a list"}},
		{"value on its own line", "in:\n  - a\n", Options{}, []string{"f.yaml:2: in: must be a mapping, not a list"}},
		{"map not string", "m: x\n", Options{}, []string{`f.yaml:1: m: must be a mapping, not the string "x"`}},
		{"map entry", "m:\n  a: {n: x}\n", Options{}, []string{`f.yaml:2: m.a.n: must be an integer, not the string "x"`}},
		{"pointer target", "p: {n: true}\n", Options{}, []string{"f.yaml:1: p.n: must be an integer, not the boolean true"}},
		{"parser", "size: 5\n", Options{}, []string{`f.yaml:1: size: must be a size like 4k, not "5"`}},
		{"parser not list", "size: [4k]\n", Options{}, []string{"f.yaml:1: size: must be a single value, not a list"}},
		{"parser not null", "size: ~\n", Options{}, []string{"f.yaml:1: size: must be a single value, not null"}},
		{"document not mapping", "- a\n", Options{}, []string{"f.yaml:1: must be a mapping, not a list"}},
		{"alias names where it is used", "l: &x [a]\ns: *x\n", Options{}, []string{"f.yaml:2: s: must be a string, not a list"}},
		{"every problem at once", "s: [a]\ni: x\nb: 1\nzz: 1\n", Options{}, []string{
			"f.yaml:1: s: must be a string, not a list",
			`f.yaml:2: i: must be an integer, not the string "x"`,
			"f.yaml:3: b: must be true or false, not the integer 1",
			"f.yaml:4: zz: unknown field (" + known + ")"}},
		{"too many problems", "l: [[a], [b], [c], [d]]\n", Options{MaxProblems: 2}, []string{
			"f.yaml:1: l[0]: must be a string, not a list",
			"f.yaml:1: l[1]: must be a string, not a list",
			"f.yaml:1: l[2]: too many problems (more than 2); the rest of the document was not checked"}},
		{"node budget", "ll: [[a, b], [c, d]]\n", Options{MaxNodes: 5}, []string{
			"f.yaml:1: ll[0][1]: document too large (more than 5 keys and values after expanding aliases)"}},
		{"depth", "ll: [[a]]\n", Options{MaxDepth: 1}, []string{"f.yaml:1: ll[0]: nested too deeply (more than 1 levels)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var v schema
			_, errs := Decode("f.yaml", root(t, tc.src), &v, tc.opts)
			if got := problemLines(errs); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

// TestDecodeValues checks what valid documents decode to.
func TestDecodeValues(t *testing.T) {
	src := `s: 2088000000000042
i: 1_000
i8: -0x10
b: True
l: [a, "b", 7]
ll: [[a], []]
m:
  x: {name: one}
  y: {n: 0o17}
p: {name: pointed}
in: {name: inner, n: +3}
size: 4k
psize: 8k
`
	var v schema
	_, errs := Decode("f.yaml", root(t, src), &v, Options{})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	ps := size(8192)
	want := schema{S: "2088000000000042", I: 1000, I8: -16, B: true, L: []string{"a", "b", "7"},
		LL: [][]string{{"a"}, {}}, M: map[string]item{"x": {Name: "one"}, "y": {N: 15}},
		P: &item{Name: "pointed"}, In: item{Name: "inner", N: 3}, Size: 4096, PSize: &ps}
	if !reflect.DeepEqual(v, want) {
		t.Errorf("got  %+v\nwant %+v", v, want)
	}
}

// TestDecodeNull checks that null leaves optional fields alone, and every
// field with NullIsZero.
func TestDecodeNull(t *testing.T) {
	src := "s:\ni: ~\nb:\nl:\nm:\np:\nin:\nsize:\n"
	start := schema{S: "default", I: 7, L: []string{"kept"}, P: &item{Name: "kept"}}

	v := start
	pos, errs := Decode("f.yaml", root(t, src), &v, Options{NullIsZero: true})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	if !reflect.DeepEqual(v, start) {
		t.Errorf("NullIsZero changed fields: %+v", v)
	}
	// A null left to a default counts as not written, so that a default
	// applied after decoding fills it; its line is still known. A null
	// list, map or pointer is present: nil is its value.
	for path, want := range map[string]struct {
		present bool
		line    int
	}{"s": {false, 1}, "i": {false, 2}, "b": {false, 3}, "in": {false, 7}, "size": {false, 8},
		"l": {true, 4}, "m": {true, 5}, "p": {true, 6}} {
		if got := pos.Present(path); got != want.present {
			t.Errorf("NullIsZero: Present(%q) = %v, want %v", path, got, want.present)
		}
		if got := pos.Line(path); got != want.line {
			t.Errorf("NullIsZero: Line(%q) = %d, want %d", path, got, want.line)
		}
	}

	v = schema{}
	pos, errs = Decode("f.yaml", root(t, "l:\nm:\np:\n"), &v, Options{})
	if len(errs) > 0 || v.L != nil || v.M != nil || v.P != nil {
		t.Errorf("null list, map, pointer: %+v %v", v, errs)
	}
	if !pos.Present("p") || pos.Line("p") != 3 {
		t.Errorf("a null field is present: %v", pos)
	}
}

// TestPositions checks the lines recorded per field path.
func TestPositions(t *testing.T) {
	src := `s: a
in:
  name: x
l:
  - a
  -
    b
m:
  k:
    n: x
i: [wrong]
`
	pos, _ := Decode("f.yaml", root(t, src), &schema{}, Options{})
	for path, line := range map[string]int{
		"s": 1, "in": 2, "in.name": 3, "l": 4, "l[0]": 5, "l[1]": 7, "m": 8, "m.k": 9, "m.k.n": 10, "i": 11,
	} {
		if got, ok := pos[path]; !ok || got != line {
			t.Errorf("%s: line %d (present %v), want %d", path, got, ok, line)
		}
	}
	if pos.Present("in.n") || pos.Present("b") {
		t.Errorf("fields not written are present: %v", pos)
	}
	for path, line := range map[string]int{"in.n": 2, "l[1].x": 7, "b": 0, "": 0} {
		if got := pos.Line(path); got != line {
			t.Errorf("Line(%q) = %d, want %d", path, got, line)
		}
	}
}

// TestScalarHook checks substitution: text from the hook is parsed by its
// characters, text from the document by its tag.
func TestScalarHook(t *testing.T) {
	env := map[string]string{"N": "12", "X": "x", "T": "TRUE", "BIG": "99999999999"}
	var calls []string
	opts := Options{Scalar: func(s Scalar) (string, bool, error) {
		calls = append(calls, fmt.Sprintf("%s %s", s.Path, s.Type))
		name, ok := strings.CutPrefix(s.Node.Value, "$")
		if !ok {
			return strings.ToUpper(s.Node.Value), false, nil
		}
		v, ok := env[name]
		if !ok {
			return "", false, errors.New("not set: " + name)
		}
		return v, true, nil
	}}
	src := "s: $X\ni: $N\ni8: $BIG\nb: $T\nin: {name: plain, n: $X}\nl: [$UNSET, \"7\"]\nsize: 4k\np:\n"
	var v schema
	_, errs := Decode("f.yaml", root(t, src), &v, opts)
	want := []string{
		"f.yaml:3: i8: integer 99999999999 out of range",
		`f.yaml:5: in.n: must be an integer, not the string "x"`,
		"f.yaml:6: l[0]: not set: UNSET",
		`f.yaml:7: size: must be a size like 4k, not "4K"`,
	}
	if got := problemLines(errs); !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if v.S != "x" || v.I != 12 || !v.B || v.In.Name != "PLAIN" || v.L[1] != "7" {
		t.Errorf("values: %+v", v)
	}
	wantCalls := []string{"s string", "i int", "i8 int8", "b bool", "in.name string", "in.n int", "l[0] string", "l[1] string", "size strictyaml.size"}
	if !reflect.DeepEqual(calls, wantCalls) {
		t.Errorf("hook calls %q, want %q (never for null or collections)", calls, wantCalls)
	}
}

// tree is a recursive schema: only the depth limit bounds its nesting.
type tree struct {
	Name string `yaml:"name"`
	Kids []tree `yaml:"kids"`
}

func TestDecodeLimits(t *testing.T) {
	t.Run("deep nesting", func(t *testing.T) {
		src := strings.Repeat("{kids: [", 200) + strings.Repeat("]}", 200)
		_, errs := Decode("f.yaml", root(t, src), &tree{}, Options{})
		if len(errs) != 1 || !strings.Contains(errs[0].Msg, "nested too deeply (more than 64 levels)") {
			t.Errorf("got %v", errs)
		}
	})
	t.Run("alias cycle", func(t *testing.T) {
		_, errs := Decode("f.yaml", root(t, "kids: &k [{kids: *k}]\n"), &tree{}, Options{})
		if len(errs) != 1 || !strings.Contains(errs[0].Msg, "nested too deeply") {
			t.Errorf("got %v", errs)
		}
	})
	t.Run("billion laughs", func(t *testing.T) {
		d := newDecoder("f.yaml", Options{})
		d.value(root(t, string(laughs(9, 10))), reflect.ValueOf(&tree{}).Elem(), "", 0, 0)
		if d.nodes != DefaultMaxNodes+1 {
			t.Errorf("visited %d nodes, want the budget %d and one", d.nodes, DefaultMaxNodes)
		}
		want := "document too large (more than 400000 keys and values after expanding aliases)"
		if len(d.errs) != 1 || d.errs[0].Msg != want {
			t.Errorf("got %v, want one %q", d.errs, want)
		}
	})
	t.Run("aliased unknown fields", func(t *testing.T) {
		// Each alias repeats 200 unknown fields: problems stop at the cap.
		var b strings.Builder
		b.WriteString("name: &m {")
		for i := range 200 {
			fmt.Fprintf(&b, "f%d: 1, ", i)
		}
		b.WriteString("}\nkids: [" + strings.Repeat("*m, ", 1000) + "]\n")
		_, errs := Decode("f.yaml", root(t, b.String()), &tree{}, Options{})
		if len(errs) != DefaultMaxProblems+1 || !strings.HasPrefix(errs[len(errs)-1].Msg, "too many problems") {
			t.Errorf("%d problems, last %v", len(errs), errs[len(errs)-1])
		}
	})
}

// laughs returns a "billion laughs" document for the tree schema: levels
// lists of width aliases, each to the list before, width^levels names in all.
func laughs(levels, width int) []byte {
	var b strings.Builder
	b.WriteString("kids:\n  - &a0 {name: lol}\n")
	for i := 1; i <= levels; i++ {
		fmt.Fprintf(&b, "  - &a%d {kids: [*a%d", i, i-1)
		b.WriteString(strings.Repeat(fmt.Sprintf(", *a%d", i-1), width-1))
		b.WriteString("]}\n")
	}
	return []byte(b.String())
}

func TestDecodeUnsupported(t *testing.T) {
	for _, v := range []any{&struct {
		F float64 `yaml:"f"`
	}{}, &struct {
		M map[int]string `yaml:"m"`
	}{}, struct{}{}, (*schema)(nil)} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%T: no panic", v)
				}
			}()
			Decode("f.yaml", root(t, "f: 1\nm: {1: a}\n"), v, Options{})
		}()
	}
}

// cellSet takes `all`, a list of names or a mapping {city: X}.
type cellSet struct {
	kind  yaml.Kind
	word  string
	names []string
	sel   struct {
		City string `yaml:"city"`
	}
}

func (c *cellSet) UnionTarget(k yaml.Kind) any {
	c.kind = k
	targets := map[yaml.Kind]any{yaml.ScalarNode: &c.word, yaml.SequenceNode: &c.names, yaml.MappingNode: &c.sel}
	return targets[k]
}

func (c *cellSet) UnionWant() string { return "all, a list or {city: X}" }

// TestDecodeUnion decodes each shape of a union at the field's own path:
// its problems and positions read as if the field had that shape's type.
func TestDecodeUnion(t *testing.T) {
	type doc struct {
		Cells *cellSet `yaml:"cells"`
	}
	for _, tc := range []struct {
		src   string
		check func(c *cellSet) bool
		want  []string
		line  map[string]int
	}{
		{src: "cells: all\n", check: func(c *cellSet) bool { return c.kind == yaml.ScalarNode && c.word == "all" }},
		{src: "cells:\n  - a\n  - b\n", check: func(c *cellSet) bool { return strings.Join(c.names, ",") == "a,b" },
			line: map[string]int{"cells": 1, "cells[1]": 3}},
		{src: "cells: {city: hz}\n", check: func(c *cellSet) bool { return c.sel.City == "hz" }},
		{src: "cells: {town: hz}\n", want: []string{"f.yaml:1: cells.town: unknown field (known: city)"}},
		{src: "cells: [a, [b]]\n", want: []string{"f.yaml:1: cells[1]: must be a string, not a list"}},
		{src: "cells: &x all\nother: *x\n", want: []string{"f.yaml:2: other: unknown field (known: cells)"},
			check: func(c *cellSet) bool { return c.word == "all" }},
	} {
		var v doc
		pos, errs := Decode("f.yaml", root(t, tc.src), &v, Options{})
		if got := problemLines(errs); strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("%q: problems %q, want %q", tc.src, got, tc.want)
		}
		if tc.check != nil && (v.Cells == nil || !tc.check(v.Cells)) {
			t.Errorf("%q: decoded %+v", tc.src, v.Cells)
		}
		for path, line := range tc.line {
			if pos.Line(path) != line {
				t.Errorf("%q: %s at line %d, want %d", tc.src, path, pos.Line(path), line)
			}
		}
	}
}
