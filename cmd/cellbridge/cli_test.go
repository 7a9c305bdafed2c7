package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cellbridge/cellbridge/router"
)

const cliExampleRules = "../../deploy/rules"

// runCLI runs the command line in-process.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = realMain(args, &out, &errb)
	return code, out.String(), errb.String()
}

// cliCopyRules copies the example rules into a temp dir, applying edits
// (file → old/new pairs).
func cliCopyRules(t *testing.T, edits map[string][]string) string {
	t.Helper()
	dir := t.TempDir()
	entries, err := os.ReadDir(cliExampleRules)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(cliExampleRules, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		ed := edits[e.Name()]
		for i := 0; i+1 < len(ed); i += 2 {
			if !strings.Contains(s, ed[i]) {
				t.Fatalf("%s: %q not found", e.Name(), ed[i])
			}
			s = strings.Replace(s, ed[i], ed[i+1], 1)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// cliLineOf returns the 1-based line of the first occurrence of text in an
// example rule file, so that tests survive edits to the comments.
func cliLineOf(t *testing.T, file, text string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cliExampleRules, file))
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(b), text)
	if i < 0 {
		t.Fatalf("%s: %q not found", file, text)
	}
	return strings.Count(string(b[:i]), "\n") + 1
}

func TestCLIHelpAndUsage(t *testing.T) {
	code, out, _ := runCLI(t, "-h")
	if code != exitOK {
		t.Fatalf("-h exit %d", code)
	}
	for _, name := range []string{"validate", "route", "diff"} {
		if !strings.Contains(out, "  "+name) {
			t.Errorf("-h does not list %s:\n%s", name, out)
		}
	}
	for _, name := range []string{"validate", "route", "diff"} {
		code, out, _ := runCLI(t, name, "-h")
		if code != exitOK || !strings.Contains(out, "Usage: cellbridge "+name) {
			t.Errorf("%s -h: exit %d\n%s", name, code, out)
		}
	}
	if code, out, _ := runCLI(t, "help", "route"); code != exitOK || !strings.Contains(out, "-topic NAME") {
		t.Errorf("help route: exit %d\n%s", code, out)
	}
	if code, out, _ := runCLI(t, "-version"); code != exitOK || !strings.HasPrefix(out, "cellbridge dev") {
		t.Errorf("-version: exit %d %q", code, out)
	}
	for _, args := range [][]string{
		{},
		{"nope"},
		{"help", "nope"},
		{"validate"},
		{"validate", "a", "b"},
		{"route", "-nope"},
		{"route", "-key", "1"},        // no -topic
		{"route", "-topic", "orders"}, // neither key nor message
		{"route", "-topic", "orders", "-key", "1", "-subject", "x"}, // both
		{"route", "-topic", "orders", "-header", "novalue"},
		{"route", "-topic", "orders", "-key", "1", "extra"},
		{"diff", cliExampleRules},
	} {
		if code, _, errOut := runCLI(t, args...); code != exitUsage || errOut == "" {
			t.Errorf("%q: exit %d, stderr %q; want %d with a message", args, code, errOut, exitUsage)
		}
	}
}

func TestCLIValidate(t *testing.T) {
	code, out, errOut := runCLI(t, "validate", cliExampleRules)
	if code != exitOK || !strings.HasPrefix(out, "ok: ") || !strings.Contains(out, "version 1, 100 shards, 4 cells") || errOut != "" {
		t.Fatalf("exit %d\n%s%s", code, out, errOut)
	}
	broken := cliCopyRules(t, map[string][]string{
		"cellmap.yaml": {"failover: rz00", "failover: rz99"},
		"orders.yaml":  {"json: user.id", "json: user.id\n  header: X-User-Id"},
	})
	code, out, errOut = runCLI(t, "validate", broken)
	if code != exitError || out != "" {
		t.Fatalf("exit %d, stdout %q", code, out)
	}
	for _, want := range []string{
		fmt.Sprintf("%s:%d: cells[1].failover: unknown cell \"rz99\"", filepath.Join(broken, "cellmap.yaml"), cliLineOf(t, "cellmap.yaml", "failover: rz00")),
		fmt.Sprintf("%s:%d: key: conflicting key sources header, json", filepath.Join(broken, "orders.yaml"), cliLineOf(t, "orders.yaml", "key:")),
		"2 problems",
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("missing %q in:\n%s", want, errOut)
		}
	}
}

func TestCLIRoute(t *testing.T) {
	decode := func(t *testing.T, out string) router.Decision {
		t.Helper()
		if strings.Count(out, "\n") != 1 {
			t.Fatalf("want one JSON line, got %q", out)
		}
		var d router.Decision
		if err := json.Unmarshal([]byte(out), &d); err != nil {
			t.Fatal(err)
		}
		return d
	}
	code, out, errOut := runCLI(t, "route", "-rules", cliExampleRules, "-topic", "payments", "-key", "2088000000012345")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if d := decode(t, out); d.Cell != "rz01" || d.Shard != 34 || d.Reason != router.ReasonOwner || d.Target.Subject != "cell.rz01.payments" || d.Version != 1 {
		t.Fatalf("%+v", d)
	}

	code, out, _ = runCLI(t, "route", "-rules", cliExampleRules, "-topic", "payments", "-header", "x-user-id=2088000000000042")
	if d := decode(t, out); code != exitOK || d.Reason != router.ReasonPin || d.Cell != "rz10" {
		t.Fatalf("exit %d %+v", code, d)
	}

	body := filepath.Join(t.TempDir(), "order.json")
	if err := os.WriteFile(body, []byte(`{"user":{"id":2088000000012345678}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, _ = runCLI(t, "route", "-rules", cliExampleRules, "-topic", "orders", "-body", body)
	if d := decode(t, out); code != exitOK || d.Key != "2088000000012345678" || d.Shard != 67 || d.Cell != "rz10" {
		t.Fatalf("exit %d %+v", code, d)
	}

	// No key: a decision (dead-letter), not an error.
	code, out, _ = runCLI(t, "route", "-rules", cliExampleRules, "-topic", "orders", "-key", "")
	if d := decode(t, out); code != exitOK || d.Reason != router.ReasonDLQ || d.Target.Subject != "dlq.orders" || d.Explain == "" {
		t.Fatalf("exit %d %+v", code, d)
	}

	if code, _, errOut := runCLI(t, "route", "-rules", cliExampleRules, "-topic", "nope", "-key", "1"); code != exitError || !strings.Contains(errOut, "known: orders, payments") {
		t.Fatalf("unknown topic: exit %d %q", code, errOut)
	}
	if code, _, _ := runCLI(t, "route", "-rules", t.TempDir(), "-topic", "orders", "-key", "1"); code != exitError {
		t.Fatalf("empty rules dir: exit %d", code)
	}
	if code, _, _ := runCLI(t, "route", "-rules", cliExampleRules, "-topic", "orders", "-body", body+".missing"); code != exitError {
		t.Fatalf("missing body: exit %d", code)
	}
}

func TestCLIDiff(t *testing.T) {
	code, out, _ := runCLI(t, "diff", cliExampleRules, cliExampleRules)
	if code != exitOK || !strings.Contains(out, "no changes") {
		t.Fatalf("exit %d\n%s", code, out)
	}
	next := cliCopyRules(t, map[string][]string{"cellmap.yaml": {
		"version: 1", "version: 3",
		`shards: ["0-32"]`, `shards: ["0-29"]`,
		`shards: ["66-99"]`, `shards: ["30-32", "66-99"]`,
	}})
	code, out, _ = runCLI(t, "diff", cliExampleRules, next)
	if code != exitOK {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{
		"rules version 1 → 3, 100 shards",
		"rz00   → rz10    30-32                   3 shards    3.0%",
		`blocked: ["30-32"]`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	code, out, _ = runCLI(t, "diff", "-json", cliExampleRules, next)
	var r router.DiffReport
	if err := json.Unmarshal([]byte(out), &r); err != nil || code != exitOK || len(r.Block) != 1 || r.Block[0] != (router.Range{From: 30, To: 32}) {
		t.Fatalf("exit %d %v %+v", code, err, r)
	}
	if code, _, _ := runCLI(t, "diff", cliExampleRules, t.TempDir()); code != exitError {
		t.Fatalf("invalid new rules: exit %d", code)
	}
}
