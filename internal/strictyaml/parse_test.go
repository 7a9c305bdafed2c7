package strictyaml

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestDocuments(t *testing.T) {
	for _, tc := range []struct {
		name  string
		src   string
		roots []int // line of each root
		want  []string
	}{
		{"empty", "", nil, nil},
		{"comments only", "# nothing\n", nil, nil},
		{"lone separator", "---\n", nil, nil},
		{"null document", "~\n", nil, nil},
		{"several", "a: 1\n---\n---\n~\n---\nb: 2\n", []int{1, 6}, nil},
		{"scanner error", "a: 1\nb: \"x\n", nil, []string{"f.yaml:2: invalid YAML: found unexpected end of stream"}},
		{"parser error", "a: 1\nb: [1, 2\nc: 3\n", nil, []string{"f.yaml:2: invalid YAML: did not find expected ',' or ']' (in the collection starting on this line)"}},
		{"error after a document", "a: 1\n---\nb: [\n", []int{1}, []string{"f.yaml:3: invalid YAML: did not find expected node content (in the collection starting on this line)"}},
		{"parser error on the last line", "rules: [", nil, []string{"f.yaml:1: invalid YAML: did not find expected node content (in the collection starting on this line)"}},
		{"too deep for yaml.v3", strings.Repeat("[", 10001), nil, []string{"f.yaml: invalid YAML: exceeded max depth of 10000"}},
		{"unknown anchor", "a: *x\n", nil, []string{"f.yaml: invalid YAML: unknown anchor 'x' referenced"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			roots, errs := Documents("f.yaml", []byte(tc.src))
			var lines []int
			for _, r := range roots {
				lines = append(lines, r.Line)
			}
			if !reflect.DeepEqual(lines, tc.roots) {
				t.Errorf("roots at lines %v, want %v", lines, tc.roots)
			}
			if got := problemLines(errs); !reflect.DeepEqual(got, tc.want) && (len(got) > 0 || len(tc.want) > 0) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestDocumentsSizeCap(t *testing.T) {
	data := []byte("a: " + strings.Repeat("x", MaxFileBytes))
	roots, errs := Documents("f.yaml", data)
	want := fmt.Sprintf("f.yaml: file too large (%d bytes; at most %d)", len(data), MaxFileBytes)
	if roots != nil || len(errs) != 1 || errs[0].String() != want {
		t.Errorf("got %d roots, %v; want %q", len(roots), errs, want)
	}
	if _, errs := Documents("f.yaml", data[:MaxFileBytes]); len(errs) > 0 {
		t.Errorf("a file of MaxFileBytes is refused: %v", errs)
	}
}

func TestProblemString(t *testing.T) {
	for _, tc := range []struct {
		p    Problem
		want string
	}{
		{Problem{File: "f.yaml", Line: 3, Field: "a.b", Msg: "m"}, "f.yaml:3: a.b: m"},
		{Problem{File: "f.yaml", Field: "a", Msg: "m"}, "f.yaml: a: m"},
		{Problem{File: "f.yaml", Line: 2, Msg: "m"}, "f.yaml:2: m"},
		{Problem{Field: "a", Msg: "m"}, "a: m"},
		{Problem{Line: 4, Msg: "m"}, "m"},
	} {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.p, got, tc.want)
		}
	}
}

func TestErrors(t *testing.T) {
	var e Errors
	e.Addf("b.yaml", 2, "x", "first %d", 1)
	e.Addf("a.yaml", 9, "", "second")
	e.Addf("b.yaml", 1, "", "third")
	e.Addf("b.yaml", 2, "y", "fourth")
	e.Addf("a.yaml", 0, "", "fifth")
	e.Sort()
	want := "a.yaml: fifth\na.yaml:9: second\nb.yaml:1: third\nb.yaml:2: x: first 1\nb.yaml:2: y: fourth"
	if e.Error() != want {
		t.Errorf("got\n%s\nwant\n%s", e.Error(), want)
	}

	// Functions return Errors or *Errors; errors.As finds either with a
	// target of either type.
	for _, err := range []error{fmt.Errorf("load: %w", e), fmt.Errorf("load: %w", &e)} {
		var v Errors
		if !errors.As(err, &v) || len(v) != 5 {
			t.Errorf("errors.As(%T, *Errors): %v", errors.Unwrap(err), v)
		}
		var p *Errors
		if !errors.As(err, &p) || len(*p) != 5 {
			t.Errorf("errors.As(%T, **Errors): %v", errors.Unwrap(err), p)
		}
	}
	if errors.As(errors.New("other"), new(*Errors)) {
		t.Error("errors.As matched an unrelated error")
	}
}
