package strictyaml

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// MaxFileBytes bounds the size of one file given to Documents. yaml.v3 builds
// the whole node tree before anything can be checked, and the tree takes up
// to about 80 times the file's size (measured with `[1,1,1,...]`: 2 MiB of
// input hold about 170 MiB of nodes). 2 MiB leaves room for any document the
// node budget of Decode admits when written out plainly (60,000 pins of a
// cell map are about 2 MiB), and is twice what a Kubernetes ConfigMap can
// hold.
const MaxFileBytes = 2 << 20

// Documents parses every YAML document of data and returns the root node of
// each, in file order. Empty documents (nothing, a comment, a lone `---`, a
// null) are left out, so a file without content yields none. file names the
// file in problems.
//
// On a syntax error it returns the documents read before the error and one
// problem located as well as yaml.v3 allows (see SyntaxProblem): the parser
// cannot resynchronise, so the rest of the file is not read. A file larger
// than MaxFileBytes is refused without parsing.
//
// Aliases are not expanded here: a node tree holds each anchored node once,
// and Decode bounds the expansion.
func Documents(file string, data []byte) ([]*yaml.Node, Errors) {
	if err := checkSize(data); err != nil {
		return nil, Errors{{File: file, Msg: err.Error()}}
	}
	docs, err := Parse(data)
	var roots []*yaml.Node
	for _, doc := range docs {
		if len(doc.Content) > 0 && !isNull(doc.Content[0]) {
			roots = append(roots, doc.Content[0])
		}
	}
	if err != nil {
		p := SyntaxProblem(file, err)
		// A parser error in a collection that starts on the first line is
		// reported at the 0-based line of the mistake, which the fix-up
		// can move past the end of the file.
		p.Line = min(p.Line, lineCount(data))
		return roots, Errors{p}
	}
	return roots, nil
}

// lineCount returns the number of lines of data that hold any character,
// counting "\n", "\r\n" and a lone "\r" as line breaks, as yaml.v3 does.
func lineCount(data []byte) int {
	n := bytes.Count(data, []byte("\n")) + bytes.Count(data, []byte("\r")) - bytes.Count(data, []byte("\r\n"))
	if len(data) > 0 && data[len(data)-1] != '\n' && data[len(data)-1] != '\r' {
		n++
	}
	return n
}

// Parse returns every document of data as a yaml.DocumentNode, empty ones
// included, for a caller that rewrites a file and must keep all of it. It
// stops at the first syntax error, returning the documents before it and
// yaml.v3's error, and refuses a file larger than MaxFileBytes. Checking
// callers use Documents.
func Parse(data []byte) ([]*yaml.Node, error) {
	if err := checkSize(data); err != nil {
		return nil, err
	}
	var docs []*yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var doc yaml.Node
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return docs, err
		}
		docs = append(docs, &doc)
	}
}

func checkSize(data []byte) error {
	if len(data) > MaxFileBytes {
		return fmt.Errorf("file too large (%d bytes; at most %d)", len(data), MaxFileBytes)
	}
	return nil
}

// yaml.v3 parser errors (as opposed to scanner errors) carry the 0-based line
// of the enclosing block or flow collection instead of the 1-based line of
// the mistake; these are their message prefixes.
var yamlParserErrors = []string{
	"did not find expected <", "did not find expected ',' or", "did not find expected '-' indicator",
	"did not find expected key", "did not find expected node content", "found undefined tag handle",
	"found duplicate %", "found incompatible YAML document",
}

var yamlErrLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// SyntaxProblem turns a yaml.v3 parse error into a problem of file, with the
// line fixed up for parser errors (which yaml.v3 reports 0-based, at the
// collection that encloses the mistake) and marked as such in the message.
// Errors without a line become a problem without one.
func SyntaxProblem(file string, err error) Problem {
	msg := err.Error()
	if m := yamlErrLine.FindStringSubmatch(msg); m != nil {
		l, _ := strconv.Atoi(m[1])
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
