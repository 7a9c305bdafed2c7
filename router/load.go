package router

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// Schema of the rule files (DESIGN.md section 3). Field names are a public
// contract: tests, deployments and users depend on them.

type cellMapDoc struct {
	Kind        string    `yaml:"kind"`
	Description string    `yaml:"description"`
	Version     int64     `yaml:"version"`
	Shards      int       `yaml:"shards"`
	Global      string    `yaml:"global"`
	Cells       []cellDoc `yaml:"cells"`
	Pins        []pinDoc  `yaml:"pins"`
	Blocked     []string  `yaml:"blocked"`
}

type cellDoc struct {
	Name     string   `yaml:"name"`
	City     string   `yaml:"city"`
	State    string   `yaml:"state"`
	Failover string   `yaml:"failover"`
	Shards   []string `yaml:"shards"`
}

type pinDoc struct {
	Key  string `yaml:"key"`
	Cell string `yaml:"cell"`
}

type topicRuleDoc struct {
	Kind         string     `yaml:"kind"`
	Description  string     `yaml:"description"`
	Name         string     `yaml:"name"`
	Source       sourceDoc  `yaml:"source"`
	Key          keyDoc     `yaml:"key"`
	Shard        shardDoc   `yaml:"shard"`
	Target       targetDoc  `yaml:"target"`
	OnMissingKey string     `yaml:"onMissingKey"`
	DLQ          *targetDoc `yaml:"dlq"`
}

type sourceDoc struct {
	Broker     string `yaml:"broker"`
	Stream     string `yaml:"stream"`
	Subject    string `yaml:"subject"`
	Group      string `yaml:"group"`
	Topic      string `yaml:"topic"`
	Tags       string `yaml:"tags"`
	Partitions int    `yaml:"partitions"`
	Ordering   string `yaml:"ordering"`
	Acks       string `yaml:"acks"`
}

type keyDoc struct {
	Header       string `yaml:"header"`
	JSON         string `yaml:"json"`
	SubjectToken int    `yaml:"subjectToken"`
	RocketMQKeys bool   `yaml:"rocketmqKeys"`
}

type shardDoc struct {
	Func string `yaml:"func"`
	From int    `yaml:"from"`
	To   int    `yaml:"to"`
}

type targetDoc struct {
	Broker  string `yaml:"broker"`
	Subject string `yaml:"subject"`
	Topic   string `yaml:"topic"`
	// Cells makes the rule a broadcast rule (target only).
	Cells         *cellsDoc `yaml:"cells"`
	ExcludeOrigin bool      `yaml:"excludeOrigin"`
}

// cellsDoc is target.cells: the word `all`, a list of cell names, or a
// selector mapping such as {city: hz}.
type cellsDoc struct {
	kind     yaml.Kind
	word     string
	names    []string
	selector selectorDoc
}

type selectorDoc struct {
	City string `yaml:"city"`
}

// UnionTarget implements strictyaml.Union.
func (c *cellsDoc) UnionTarget(k yaml.Kind) any {
	c.kind = k
	switch k {
	case yaml.ScalarNode:
		return &c.word
	case yaml.SequenceNode:
		return &c.names
	case yaml.MappingNode:
		return &c.selector
	}
	return nil
}

// UnionWant implements strictyaml.Union.
func (c *cellsDoc) UnionWant() string {
	return "all, a list of cells or a selector such as {city: hz}"
}

// Document kinds.
const (
	KindCellMap   = "CellMap"
	KindTopicRule = "TopicRule"
)

// ruleFile is one file read from a rules directory.
type ruleFile struct {
	path string // as shown in problems: dir joined with the entry name
	data []byte
}

// readAttempts bounds how often readDir reads a directory that keeps
// changing under it.
const readAttempts = 5

// readHook, when set (tests), is called after each rule file is read.
var readHook func(path string)

// readDir reads every *.yaml and *.yml file of dir (not recursive) as one
// consistent set. The files are read one at a time, so a change between two
// reads (a ConfigMap `..data` swap, another file renamed into place) could
// mix old and new files: the directory is read again until two reads in a
// row agree, at most readAttempts times.
func readDir(dir string) ([]ruleFile, []Problem) {
	files, probs := readDirOnce(dir)
	for range readAttempts {
		again, againProbs := readDirOnce(dir)
		if sameRead(files, probs, again, againProbs) {
			return again, againProbs
		}
		files, probs = again, againProbs
	}
	return nil, []Problem{{File: dir, Msg: fmt.Sprintf("the rule files changed every time they were read (%d times): not loaded; they are read again at the next change", readAttempts+1)}}
}

// sameRead reports whether two reads of a directory found the same files
// with the same content and the same problems.
func sameRead(a []ruleFile, ap []Problem, b []ruleFile, bp []Problem) bool {
	if len(a) != len(b) || len(ap) != len(bp) {
		return false
	}
	for i := range a {
		if a[i].path != b[i].path || string(a[i].data) != string(b[i].data) {
			return false
		}
	}
	for i := range ap {
		if ap[i] != bp[i] {
			return false
		}
	}
	return true
}

// readDirOnce reads every *.yaml and *.yml file of dir once. Hidden
// entries are skipped: Kubernetes ConfigMap volumes keep the real files in
// `..<timestamp>` directories behind a `..data` symlink and expose each key
// as `name.yaml -> ..data/name.yaml`, so following the visible symlinks reads
// every file exactly once. Files are returned sorted by name.
func readDirOnce(dir string) ([]ruleFile, []Problem) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, []Problem{{File: dir, Msg: fmt.Sprintf("cannot read rules directory: %v", errors.Unwrap(err))}}
	}
	var files []ruleFile
	var probs []Problem
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") {
			continue
		}
		ext := strings.ToLower(filepath.Ext(name))
		if ext != ".yaml" && ext != ".yml" {
			continue
		}
		p := filepath.Join(dir, name)
		fi, err := os.Stat(p) // follows symlinks
		if err != nil {
			probs = append(probs, Problem{File: p, Msg: fmt.Sprintf("cannot read: %v", errors.Unwrap(err))})
			continue
		}
		if !fi.Mode().IsRegular() {
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			probs = append(probs, Problem{File: p, Msg: fmt.Sprintf("cannot read: %v", errors.Unwrap(err))})
			continue
		}
		files = append(files, ruleFile{path: p, data: data})
		if readHook != nil {
			readHook(p)
		}
	}
	sort.Slice(files, func(i, j int) bool { return files[i].path < files[j].path })
	if len(files) == 0 && len(probs) == 0 {
		probs = append(probs, Problem{File: dir, Msg: "no *.yaml or *.yml rule files"})
	}
	return files, probs
}

// fingerprint identifies the content of a rules directory: equal
// fingerprints mean equal files (names and bytes).
func fingerprint(files []ruleFile) string {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%s\x00%d\x00", filepath.Base(f.path), len(f.data))
		h.Write(f.data)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Load reads, validates and compiles every rule file in dir. On any problem
// it returns a nil table and an error of type *Errors listing every problem
// found, in file and line order. It is safe to call concurrently.
func Load(dir string) (*Table, error) {
	files, probs := readDir(dir)
	if len(probs) > 0 {
		e := Errors(probs)
		return nil, &e
	}
	return loadFiles(dir, files)
}

// Parse validates and compiles rule documents held in memory; name is used
// as the file name in problems. It is what Load does for a directory with a
// single file, and serves tests and fuzzing.
func Parse(name string, data []byte) (*Table, error) {
	return loadFiles(filepath.Dir(name), []ruleFile{{path: name, data: data}})
}

type parsedCellMap struct {
	doc *doc
	cm  cellMapDoc
}

type parsedRule struct {
	doc *doc
	tr  topicRuleDoc
}

func loadFiles(dir string, files []ruleFile) (*Table, error) {
	p := &Errors{}
	var maps []parsedCellMap
	var rules []parsedRule
	for _, f := range files {
		m, r := parseFile(f, p)
		maps = append(maps, m...)
		rules = append(rules, r...)
	}
	if len(maps) == 0 && len(*p) == 0 {
		p.Addf(dir, 0, "", "no kind: %s document", KindCellMap)
	}
	for _, m := range maps[min(1, len(maps)):] {
		m.doc.errorf("kind", "a second %s document (the first is at %s:%d); exactly one is allowed",
			KindCellMap, maps[0].doc.file, maps[0].doc.line)
	}
	if len(rules) == 0 && len(*p) == 0 {
		p.Addf(dir, 0, "", "no kind: %s document", KindTopicRule)
	}
	// Topic rules are checked even without a CellMap, so that every
	// problem is reported at once.
	t := &Table{cellIdx: map[string]int{}, globalIdx: -1, pins: map[string]int{}}
	if len(maps) > 0 {
		t = validateCellMap(maps[0].doc, &maps[0].cm)
	}
	validateRules(t, rules)
	if len(*p) > 0 {
		p.Sort()
		return nil, p
	}
	t.compile(rules)
	t.fingerprint = fingerprint(files)
	t.dir = dir
	for _, f := range files {
		t.files = append(t.files, f.path)
	}
	return t, nil
}

// parseFile splits a file into documents and decodes each by its kind.
func parseFile(f ruleFile, p *Errors) ([]parsedCellMap, []parsedRule) {
	var maps []parsedCellMap
	var rules []parsedRule
	roots, syntax := strictyaml.Documents(f.path, f.data)
	// The documents before a syntax error are checked first: problems on
	// the same line are listed in the order of the file.
	defer func() { *p = append(*p, syntax...) }()
	for _, n := range roots {
		d := &doc{file: f.path, line: n.Line, pos: strictyaml.Positions{}, probs: p}
		if n.Kind != yaml.MappingNode {
			d.errorf("", "a rule document must be a mapping, not %s", strictyaml.Describe(n))
			continue
		}
		switch kind := kindOf(n); kind {
		case KindCellMap:
			m := parsedCellMap{doc: d}
			d.decode(n, &m.cm)
			maps = append(maps, m)
		case KindTopicRule:
			r := parsedRule{doc: d}
			d.decode(n, &r.tr)
			rules = append(rules, r)
		case "":
			d.errorf("kind", "missing: must be %s or %s", KindCellMap, KindTopicRule)
		default:
			d.pos["kind"] = kindLine(n)
			d.errorf("kind", "unknown kind %q: must be %s or %s", kind, KindCellMap, KindTopicRule)
		}
	}
	return maps, rules
}

func kindOf(n *yaml.Node) string {
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == "kind" && n.Content[i+1].Kind == yaml.ScalarNode {
			return n.Content[i+1].Value
		}
	}
	return ""
}

func kindLine(n *yaml.Node) int {
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == "kind" {
			return n.Content[i].Line
		}
	}
	return n.Line
}
