package deploy

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

const (
	runbookFile = "../docs/runbook.md"
	// runbookURL is where runbook_url annotations point: docs/runbook.md on the main branch.
	runbookURL = "https://github.com/cellbridge/cellbridge/blob/main/docs/runbook.md#"
)

// requiredAlerts are the conditions someone must be paged for (the deploy issue's list); each may have
// more alerts beside it, never fewer.
var requiredAlerts = []string{
	"CellbridgeAbsent",               // bridge absent or down
	"CellbridgeTargetDown",           // one replica down
	"CellbridgeStalled",              // backlog but no progress
	"CellbridgeFreshness",            // oldest unacknowledged message too old
	"CellbridgeDLQRate",              // dead letters
	"CellbridgeHeldTooLong",          // a switch is stuck
	"CellbridgeDuplicateSpike",       // duplicate rate
	"CellbridgeSinkPublishErrors",    // sink publish errors
	"CellbridgeRulesReloadFailed",    // a rules update was refused
	"CellbridgeRulesVersionMismatch", // replicas on different rules versions
	"CellbridgeDedupeErrors",         // dedupe store errors
	"CellbridgeNotReady",             // /readyz failing
}

// loadAlertRules parses deploy/alerts/cellbridge.rules.yaml strictly.
func loadAlertRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&rf); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	return rf
}

func alerts(rf ruleFile) []rule {
	var out []rule
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert != "" {
				out = append(out, r)
			}
		}
	}
	return out
}

// promtool returns the promtool binary. CI installs it (.ci/run); elsewhere a missing promtool skips
// the test loudly instead of failing a developer's first `go test`.
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err == nil {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("promtool is not installed: CI must install Debian's prometheus package (see .ci/run): %v", err)
	}
	skipForTool(t, "promtool is not installed; `apt-get install prometheus` to run it (CI fails without it)")
	return ""
}

// envSkipLog names a file to which skipForTool appends one line per
// skipped test: `make test` prints it after the run, because `go test`
// shows a passing package's skips only with -v.
const envSkipLog = "CELLBRIDGE_SKIP_LOG"

// skipForTool skips t because a tool it needs is missing, and records the
// skip in the file envSkipLog names.
func skipForTool(t *testing.T, why string) {
	t.Helper()
	line := fmt.Sprintf("SKIPPED deploy %s: %s", t.Name(), why)
	if path := os.Getenv(envSkipLog); path != "" {
		if f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
	t.Skip(line)
}

func runPromtool(t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.Command(promtool(t), args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("promtool %s:\n%s", strings.Join(args, " "), out)
}

// writeYAML writes v as YAML into a file of the test's temporary directory and returns its path.
func writeYAML(t *testing.T, name string, v any) string {
	t.Helper()
	b, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(f, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestAlertRulesPromtool runs promtool on the rule file, on the groups of the PrometheusRule every
// overlay renders, and the rule unit tests (deploy/alerts/*_test.yaml).
func TestAlertRulesPromtool(t *testing.T) {
	promtool(t)
	runPromtool(t, "check", "rules", alertsFile)

	src := loadAlertRules(t)
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		if !reflect.DeepEqual(r.rules.Spec, src) {
			t.Fatalf("the rendered PrometheusRule's groups differ from %s", alertsFile)
		}
		runPromtool(t, "check", "rules", writeYAML(t, "prometheusrule.rules.yaml", r.rules.Spec))
	})

	tests, err := filepath.Glob("alerts/*_test.yaml")
	if err != nil || len(tests) == 0 {
		t.Fatalf("no rule unit tests in deploy/alerts (%v)", err)
	}
	runPromtool(t, append([]string{"test", "rules"}, tests...)...)
}

// TestAlertUnitTestsCoverEveryAlert: every alert has a case where it fires and one where it does not.
func TestAlertUnitTestsCoverEveryAlert(t *testing.T) {
	type unitTests struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	files, _ := filepath.Glob("alerts/*_test.yaml")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var ut unitTests
		if err := yaml.Unmarshal(b, &ut); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, tc := range ut.Tests {
			for _, a := range tc.AlertRuleTest {
				if len(a.ExpAlerts) > 0 {
					fires[a.Alertname] = true
				} else {
					quiet[a.Alertname] = true
				}
			}
		}
	}
	for _, a := range alerts(loadAlertRules(t)) {
		if !fires[a.Alert] {
			t.Errorf("%s: no promtool case in which it fires", a.Alert)
		}
		if !quiet[a.Alert] {
			t.Errorf("%s: no promtool case in which it stays quiet", a.Alert)
		}
	}
}

// TestAlertsContract: the required alerts exist, each with a severity, a summary, a description and a
// runbook link to a section that exists, and each reads only metrics the bridge exports.
func TestAlertsContract(t *testing.T) {
	rb, err := os.ReadFile(runbookFile)
	if err != nil {
		t.Fatal(err)
	}
	anchors := markdownAnchors(string(rb))
	exported := exportedMetrics(t)

	var names []string
	for _, a := range alerts(loadAlertRules(t)) {
		names = append(names, a.Alert)
		if s := a.Labels["severity"]; s != "critical" && s != "warning" {
			t.Errorf("%s: severity %q, want critical or warning", a.Alert, s)
		}
		for _, k := range []string{"summary", "description", "runbook_url"} {
			if strings.TrimSpace(a.Annotations[k]) == "" {
				t.Errorf("%s: no %s annotation", a.Alert, k)
			}
		}
		anchor, ok := strings.CutPrefix(a.Annotations["runbook_url"], runbookURL)
		if !ok {
			t.Errorf("%s: runbook_url %q does not point into %s", a.Alert, a.Annotations["runbook_url"], runbookURL)
		} else if !anchors[anchor] {
			t.Errorf("%s: runbook_url anchor #%s is no heading of docs/runbook.md", a.Alert, anchor)
		}
		if anchor != strings.ToLower(a.Alert) {
			t.Errorf("%s: runbook anchor #%s, want the section named after the alert", a.Alert, anchor)
		}
		for _, m := range promqlMetrics(a.Expr) {
			if !exported[m] {
				t.Errorf("%s reads %s, which the bridge does not export", a.Alert, m)
			}
		}
	}
	for _, want := range requiredAlerts {
		if !slices.Contains(names, want) {
			t.Errorf("alert %s is missing", want)
		}
	}
	if dup := len(names) - len(slices.Compact(slices.Sorted(slices.Values(names)))); dup > 0 {
		t.Errorf("%d alert names are used twice", dup)
	}
}

// markdownAnchors returns the anchors GitHub gives the headings of a Markdown document: lower case,
// punctuation dropped, spaces turned into hyphens, repeats numbered.
func markdownAnchors(doc string) map[string]bool {
	anchors := map[string]bool{}
	seen := map[string]int{}
	drop := regexp.MustCompile(`[^\p{L}\p{N}\- _]`)
	inFence := false
	for _, line := range strings.Split(doc, "\n") {
		if strings.HasPrefix(line, "```") {
			inFence = !inFence
		}
		if inFence || !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.TrimSpace(strings.TrimLeft(line, "#"))
		a := strings.ReplaceAll(drop.ReplaceAllString(strings.ToLower(h), ""), " ", "-")
		if n := seen[a]; n > 0 {
			anchors[a+"-"+strconv.Itoa(n)] = true
		} else {
			anchors[a] = true
		}
		seen[a]++
	}
	return anchors
}

// TestRunbook: the operations sections exist, every in-page link resolves, and every alert's section
// says what it means, what to check and what to do.
func TestRunbook(t *testing.T) {
	b, err := os.ReadFile(runbookFile)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	anchors := markdownAnchors(doc)
	for _, a := range []string{"switch-shards-between-cells", "a-cell-is-down", "change-the-rules"} {
		if !anchors[a] {
			t.Errorf("docs/runbook.md has no section #%s", a)
		}
	}
	for _, m := range regexp.MustCompile(`\]\(#([^)]+)\)`).FindAllStringSubmatch(doc, -1) {
		if !anchors[m[1]] {
			t.Errorf("docs/runbook.md links to #%s, which is no heading", m[1])
		}
	}
	for _, a := range alerts(loadAlertRules(t)) {
		_, section, ok := strings.Cut(doc, "\n### "+a.Alert+"\n")
		if !ok {
			t.Errorf("docs/runbook.md has no section ### %s", a.Alert)
			continue
		}
		if i := strings.Index(section, "\n#"); i >= 0 {
			section = section[:i]
		}
		for _, part := range []string{"**Meaning.**", "**Check.**", "**Do.**"} {
			if !strings.Contains(section, part) {
				t.Errorf("runbook section %s lacks %s", a.Alert, part)
			}
		}
	}
}
