package rulesdir

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/cellbridge/cellbridge/internal/strictyaml"
	"github.com/cellbridge/cellbridge/router"
)

// dataLink is the symlink through which a Kubernetes ConfigMap volume
// exposes its current files.
const dataLink = "..data"

// RulesDir is a rules directory that cellbridge switch and the drill update
// the way an operator's tooling does: every update replaces all files at once, so the bridge's
// watcher never sees half a change. Not safe for concurrent use.
type RulesDir struct {
	// Dir is the directory the bridge watches.
	Dir string
	// configMap is true when Dir has the ConfigMap volume layout: the files
	// live in a hidden `..<timestamp>` directory, `..data` links to it and
	// every visible file links to `..data/<name>`. An update writes a new
	// hidden directory and swaps `..data` with one rename.
	configMap bool
	n         int
}

// NewConfigMapDir creates dir (which must not exist or be empty) with the
// ConfigMap volume layout and the given files (name → content).
func NewConfigMapDir(dir string, files map[string][]byte) (*RulesDir, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("rules dir: rules dir: %w", err)
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) > 0 {
		if err == nil {
			err = errors.New("not empty")
		}
		return nil, fmt.Errorf("rules dir: rules dir %s: %w", dir, err)
	}
	d := &RulesDir{Dir: dir, configMap: true}
	return d, d.Apply(files)
}

// ConfigMap reports whether updates swap a ConfigMap volume's `..data`
// symlink (else each file is replaced by an atomic rename).
func (d *RulesDir) ConfigMap() bool { return d.configMap }

// OpenRulesDir uses an existing rules directory. With the ConfigMap layout
// (a `..data` symlink) updates swap the symlink; otherwise each file is
// replaced by an atomic rename, one after the other.
func OpenRulesDir(dir string) (*RulesDir, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("rules dir: rules dir: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("rules dir: rules dir %s is not a directory", dir)
	}
	fi, err := os.Lstat(filepath.Join(dir, dataLink))
	return &RulesDir{Dir: dir, configMap: err == nil && fi.Mode()&os.ModeSymlink != 0}, nil
}

// ReadRuleFiles returns the visible *.yaml and *.yml files of dir (following
// symlinks), the set the router loads.
func ReadRuleFiles(dir string) (map[string][]byte, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("rules dir: %w", err)
	}
	out := map[string][]byte{}
	for _, e := range ents {
		name := e.Name()
		ext := strings.ToLower(filepath.Ext(name))
		if strings.HasPrefix(name, ".") || (ext != ".yaml" && ext != ".yml") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("rules dir: %w", err)
		}
		out[name] = b
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("rules dir: no rule files in %s", dir)
	}
	return out, nil
}

// Apply replaces the directory's rule files with files: rule files not in
// files are removed.
func (d *RulesDir) Apply(files map[string][]byte) error {
	if !d.configMap {
		for _, name := range sortedNames(files) {
			if err := writeAtomic(d.Dir, name, files[name]); err != nil {
				return err
			}
		}
		old, err := ReadRuleFiles(d.Dir)
		if err != nil {
			return err
		}
		for name := range old {
			if files[name] == nil {
				if err := os.Remove(filepath.Join(d.Dir, name)); err != nil {
					return fmt.Errorf("rules dir: %w", err)
				}
			}
		}
		return nil
	}
	d.n++
	// Like the kubelet: a fresh hidden directory per update, named by time.
	ts := fmt.Sprintf("..%s.%04d", time.Now().UTC().Format("2006_01_02_15_04_05.000000000"), d.n)
	tsDir := filepath.Join(d.Dir, ts)
	if err := os.Mkdir(tsDir, 0o755); err != nil {
		return fmt.Errorf("rules dir: %w", err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(tsDir, name), b, 0o644); err != nil {
			return fmt.Errorf("rules dir: %w", err)
		}
	}
	old, _ := os.Readlink(filepath.Join(d.Dir, dataLink))
	tmp := filepath.Join(d.Dir, dataLink+"_tmp")
	_ = os.Remove(tmp)
	if err := os.Symlink(ts, tmp); err != nil {
		return fmt.Errorf("rules dir: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(d.Dir, dataLink)); err != nil {
		return fmt.Errorf("rules dir: swapping %s: %w", dataLink, err)
	}
	// Visible names link through ..data; add new ones, drop removed ones.
	ents, err := os.ReadDir(d.Dir)
	if err != nil {
		return fmt.Errorf("rules dir: %w", err)
	}
	for _, e := range ents {
		if name := e.Name(); !strings.HasPrefix(name, ".") && files[name] == nil {
			_ = os.Remove(filepath.Join(d.Dir, name))
		}
	}
	for name := range files {
		link := filepath.Join(d.Dir, name)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join(dataLink, name), link); err != nil {
			return fmt.Errorf("rules dir: %w", err)
		}
	}
	if old != "" && old != ts {
		_ = os.RemoveAll(filepath.Join(d.Dir, old))
	}
	return nil
}

func writeAtomic(dir, name string, b []byte) error {
	tmp := filepath.Join(dir, "."+name+".cellbridge-tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("rules dir: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("rules dir: %w", err)
	}
	return nil
}

func sortedNames(files map[string][]byte) []string {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// CellMapEdit describes a new CellMap relative to a rules table. Zero fields
// keep what the table has.
type CellMapEdit struct {
	Version int64
	// Owner, when set, gives the owning cell of every shard (len = shards).
	Owner []string
	// Blocked replaces the blocked list (nil keeps it; empty clears it).
	Blocked []router.Range
	// State and Failover set a cell's state and failover cell by name.
	State    map[string]string
	Failover map[string]string
}

// EditCellMap returns files with the CellMap document rewritten by e. The
// other documents and the comments are kept; only the edited fields change.
func EditCellMap(files map[string][]byte, e CellMapEdit) (map[string][]byte, error) {
	out := make(map[string][]byte, len(files))
	found := false
	for _, name := range sortedNames(files) {
		b := files[name]
		out[name] = b
		docs, err := strictyaml.Parse(b)
		if err != nil {
			return nil, fmt.Errorf("rules dir: %s: %w", name, err)
		}
		changed := false
		for _, doc := range docs {
			m := docMapping(doc)
			if m == nil || scalarOf(m, "kind") != router.KindCellMap {
				continue
			}
			if found {
				return nil, fmt.Errorf("rules dir: more than one %s document", router.KindCellMap)
			}
			found, changed = true, true
			if err := editCellMap(m, e); err != nil {
				return nil, fmt.Errorf("rules dir: %s: %w", name, err)
			}
		}
		if !changed {
			continue
		}
		var buf bytes.Buffer
		enc := yaml.NewEncoder(&buf)
		enc.SetIndent(2)
		for _, doc := range docs {
			if err := enc.Encode(doc); err != nil {
				return nil, fmt.Errorf("rules dir: %s: %w", name, err)
			}
		}
		if err := enc.Close(); err != nil {
			return nil, fmt.Errorf("rules dir: %s: %w", name, err)
		}
		out[name] = buf.Bytes()
	}
	if !found {
		return nil, fmt.Errorf("rules dir: no %s document in the rule files", router.KindCellMap)
	}
	return out, nil
}

func docMapping(doc *yaml.Node) *yaml.Node {
	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 && doc.Content[0].Kind == yaml.MappingNode {
		return doc.Content[0]
	}
	return nil
}

func lookup(m *yaml.Node, key string) *yaml.Node {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

func scalarOf(m *yaml.Node, key string) string {
	if v := lookup(m, key); v != nil && v.Kind == yaml.ScalarNode {
		return v.Value
	}
	return ""
}

// set replaces the value of key in mapping m, or appends key: v.
func set(m *yaml.Node, key string, v *yaml.Node) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			// Keep the comments that belonged to the old value.
			old := m.Content[i+1]
			v.LineComment, v.FootComment = old.LineComment, old.FootComment
			m.Content[i+1] = v
			return
		}
	}
	m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: key}, v)
}

func strNode(s string) *yaml.Node { return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: s} }

func rangesNode(rs []router.Range) *yaml.Node {
	n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Style: yaml.FlowStyle}
	for _, r := range rs {
		n.Content = append(n.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: r.String(), Style: yaml.DoubleQuotedStyle})
	}
	return n
}

func editCellMap(m *yaml.Node, e CellMapEdit) error {
	if e.Version != 0 {
		set(m, "version", &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!int", Value: strconv.FormatInt(e.Version, 10)})
	}
	if e.Blocked != nil {
		set(m, "blocked", rangesNode(e.Blocked))
	}
	cells := lookup(m, "cells")
	if cells == nil || cells.Kind != yaml.SequenceNode {
		return errors.New("CellMap has no cells list")
	}
	seen := map[string]bool{}
	for _, c := range cells.Content {
		if c.Kind != yaml.MappingNode {
			continue
		}
		name := scalarOf(c, "name")
		seen[name] = true
		if e.Owner != nil {
			owned := ownedRanges(e.Owner, name)
			if len(owned) > 0 || lookup(c, "shards") != nil {
				set(c, "shards", rangesNode(owned))
			}
		}
		if s, ok := e.State[name]; ok {
			set(c, "state", strNode(s))
		}
		if f, ok := e.Failover[name]; ok {
			set(c, "failover", strNode(f))
		}
	}
	for _, names := range []map[string]string{e.State, e.Failover} {
		for n := range names {
			if !seen[n] {
				return fmt.Errorf("no cell %q in the CellMap", n)
			}
		}
	}
	if e.Owner != nil {
		for _, o := range e.Owner {
			if !seen[o] {
				return fmt.Errorf("no cell %q in the CellMap", o)
			}
		}
	}
	return nil
}

// ownedRanges returns the ranges of shards whose owner is cell.
func ownedRanges(owner []string, cell string) []router.Range {
	var out []router.Range
	for s := 0; s < len(owner); s++ {
		if owner[s] != cell {
			continue
		}
		j := s
		for j+1 < len(owner) && owner[j+1] == cell {
			j++
		}
		out = append(out, router.Range{From: s, To: j})
		s = j
	}
	return out
}

// Owners returns the owning cell of every shard of t.
func Owners(t *router.Table) []string {
	out := make([]string, t.Shards())
	for s := range out {
		out[s] = t.Owner(s)
	}
	return out
}

// LoadFiles validates files as a rules directory (in a scratch directory
// under tmp) and returns the table.
func LoadFiles(tmp string, files map[string][]byte) (*router.Table, error) {
	dir, err := os.MkdirTemp(tmp, "rules-check-")
	if err != nil {
		return nil, fmt.Errorf("rules dir: %w", err)
	}
	defer os.RemoveAll(dir)
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return nil, fmt.Errorf("rules dir: %w", err)
		}
	}
	return router.Load(dir)
}
