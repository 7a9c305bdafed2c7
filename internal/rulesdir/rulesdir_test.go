package rulesdir

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/router"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// A ConfigMap-style directory takes updates by a ..data swap; a plain one
// by renames; both load as the router reads them.
func TestConfigMapDir(t *testing.T) {
	files, err := ReadRuleFiles("../../deploy/rules")
	if err != nil {
		t.Fatal(err)
	}
	t0, err := LoadFiles(t.TempDir(), files)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "rules")
	rd, err := NewConfigMapDir(dir, files)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := router.Load(dir); err != nil || got.Fingerprint() != t0.Fingerprint() {
		t.Fatalf("load after create: %v", err)
	}
	next, err := EditCellMap(files, CellMapEdit{Version: t0.Version() + 1, Blocked: []router.Range{{From: 5, To: 6}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := rd.Apply(next); err != nil {
		t.Fatal(err)
	}
	got, err := router.Load(dir)
	if err != nil || got.Version() != t0.Version()+1 || !got.IsBlocked(5) {
		t.Fatalf("load after apply: %v", err)
	}
	ents, _ := os.ReadDir(dir)
	var hidden []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "..") {
			hidden = append(hidden, e.Name())
		}
	}
	if len(hidden) != 2 { // ..data and the one timestamped directory
		t.Errorf("hidden entries %v", hidden)
	}
	if _, err := NewConfigMapDir(dir, files); err == nil {
		t.Error("a non-empty dir was accepted")
	}
	o, err := OpenRulesDir(dir)
	if err != nil || !o.ConfigMap() {
		t.Errorf("OpenRulesDir: %v, configMap %v", err, o.ConfigMap())
	}
	plain := t.TempDir()
	p, err := OpenRulesDir(plain)
	if err != nil || p.ConfigMap() {
		t.Fatal(err)
	}
	if err := p.Apply(next); err != nil {
		t.Fatal(err)
	}
	if got, err := router.Load(plain); err != nil || got.Version() != t0.Version()+1 {
		t.Fatalf("plain dir: %v", err)
	}
}
