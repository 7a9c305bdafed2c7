package strictyaml

import (
	"reflect"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// fuzzDoc is a schema with every kind of target and several ways to recurse,
// so that aliases in the input find somewhere to expand.
type fuzzDoc struct {
	Name  string             `yaml:"name"`
	N     int                `yaml:"n"`
	N8    int8               `yaml:"n8"`
	On    bool               `yaml:"on"`
	Size  size               `yaml:"size"`
	Kids  []fuzzDoc          `yaml:"kids"`
	Map   map[string]fuzzDoc `yaml:"map"`
	Lists [][]string         `yaml:"lists"`
	P     *fuzzDoc           `yaml:"p"`
}

// fuzzMaxNodes is a budget small enough that fuzzing reaches it often.
const fuzzMaxNodes = 5000

// FuzzDecode feeds arbitrary files to Documents and Decode. Whatever the
// input, the walk must stay within its budget (nodes visited, problems), a
// budget overrun must be reported as such and only when the input really
// expands past it, and every problem must be located inside the file.
func FuzzDecode(f *testing.F) {
	f.Add([]byte("name: a\nn: 3\nkids: [{name: b, on: true}, {size: 4k}]\nmap: {x: {p: {n8: 7}}}\nlists: [[a], []]\n"))
	f.Add(laughs(9, 10)) // 10^9 names after expansion
	f.Add(laughs(3, 30))
	f.Add([]byte("kids: &k [{kids: *k}]\n"))                                                                    // an alias inside its own anchor
	f.Add([]byte(strings.Repeat("{kids: [", 5000) + strings.Repeat("]}", 5000)))                                // 10,000 levels in flow style
	f.Add([]byte("lists:\n" + strings.Repeat("- ", 10000) + "x\n"))                                             // 10,000 levels in block style
	f.Add([]byte(strings.Repeat("[", 10001)))                                                                   // beyond yaml.v3's own depth limit
	f.Add([]byte("lists: &l [[a, b, c], [d]]\nkids: [{lists: *l}, {lists: *l}]\nmap: {a: &m {n: 1}, b: *m}\n")) // plain aliases
	f.Add([]byte("name: &m {a: 1, b: 2, c: 3}\nkids: [*m, *m, *m, *m]\n"))                                      // aliased unknown fields
	f.Add([]byte("a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\n<<: *c\n? [k]\n: v\nname: x\nname: y\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		// yaml.v3 also breaks lines at \r, NEL, LS and PS; counting each
		// break character bounds the line count from above.
		lines := 1
		for _, br := range []string{"\n", "\r", "\u0085", "\u2028", "\u2029"} {
			lines += strings.Count(string(data), br)
		}
		roots, errs := Documents("f.yaml", data)
		checkProblems(t, errs, lines)
		for _, root := range roots {
			d := newDecoder("f.yaml", Options{MaxNodes: fuzzMaxNodes})
			d.value(root, reflect.ValueOf(&fuzzDoc{}).Elem(), "", 0, 0)
			checkProblems(t, d.errs, lines)
			if d.nodes > fuzzMaxNodes+1 {
				t.Fatalf("visited %d nodes, budget %d", d.nodes, fuzzMaxNodes)
			}
			if len(d.errs) > DefaultMaxProblems+1 {
				t.Fatalf("%d problems, cap %d", len(d.errs), DefaultMaxProblems)
			}
			tooLarge := false
			for _, p := range d.errs {
				tooLarge = tooLarge || strings.HasPrefix(p.Msg, "document too large")
			}
			// The walk visits part of the expanded tree, so an overrun
			// means the tree is larger than the budget, and the walk only
			// stops short of the budget for another limit.
			if expanded := expandedSize(root, fuzzMaxNodes+1); tooLarge && expanded <= fuzzMaxNodes {
				t.Fatalf("budget overrun reported for a tree of %d nodes", expanded)
			}
			if tooLarge != (d.nodes == fuzzMaxNodes+1) {
				t.Fatalf("visited %d nodes of %d, overrun reported: %v", d.nodes, fuzzMaxNodes, tooLarge)
			}
		}
	})
}

func checkProblems(t *testing.T, errs Errors, lines int) {
	t.Helper()
	for _, p := range errs {
		if p.File != "f.yaml" || p.Msg == "" || p.Line < 0 || p.Line > lines+1 {
			t.Fatalf("bad problem %+v (file has %d lines)", p, lines)
		}
	}
}

// expandedSize counts the nodes of the tree under n with every alias
// expanded, stopping at limit.
func expandedSize(n *yaml.Node, limit int) int {
	count := 0
	var walk func(n *yaml.Node, depth int)
	walk = func(n *yaml.Node, depth int) {
		if count >= limit || depth > 2*DefaultMaxDepth {
			count = limit // a cycle, or deeper than any walk goes
			return
		}
		count++
		if n.Kind == yaml.AliasNode && n.Alias != nil {
			count--
			walk(n.Alias, depth)
			return
		}
		for _, c := range n.Content {
			walk(c, depth+1)
		}
	}
	walk(n, 0)
	return count
}
