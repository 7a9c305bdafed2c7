package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/cellbridge/cellbridge/bridge"
)

const dashboardFile = "grafana/cellbridge.json"

type dashboard struct {
	Title      string `json:"title"`
	UID        string `json:"uid"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Panels []panel `json:"panels"`
}

type panel struct {
	ID         int                      `json:"id"`
	Type       string                   `json:"type"`
	Title      string                   `json:"title"`
	Datasource *datasourceRef           `json:"datasource"`
	GridPos    struct{ H, W, X, Y int } `json:"gridPos"`
	Targets    []struct {
		Datasource *datasourceRef `json:"datasource"`
		Expr       string         `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // collapsed rows
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

func loadDashboard(t *testing.T) *dashboard {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return &d
}

func (d *dashboard) allPanels() []panel {
	var out []panel
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			out = append(out, p)
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	return out
}

// grafanaVars replaces the dashboard's variables with values a plain PromQL parser accepts.
var grafanaVars = strings.NewReplacer(
	"${datasource}", "", "$__rate_interval", "1m", "$__interval", "1m", "$__range", "1h",
	"$job", "cellbridge", "$namespace", ".*", "$rule", ".*",
)

// TestDashboard: the dashboard parses, is templated on data source and job, uses only metrics the
// bridge exports, shows what an operator needs (per-cell throughput, latency, freshness, DLQ, held,
// duplicates) and every metric of bridge.MetricList, and every query is valid PromQL (promtool
// checks them as recording rules).
func TestDashboard(t *testing.T) {
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Error("the dashboard needs a uid and a title")
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
		q := fmt.Sprint(v.Query)
		if v.Type == "query" {
			if m, ok := v.Query.(map[string]any); ok {
				q = fmt.Sprint(m["query"])
			}
			for _, name := range regexp.MustCompile(`\bcellbridge_[a-z_]+`).FindAllString(q, -1) {
				if !exportedMetrics(t)[name] {
					t.Errorf("variable %s reads %s, which the bridge does not export", v.Name, name)
				}
			}
		}
		if v.Type == "datasource" && q != "prometheus" {
			t.Errorf("datasource variable %s selects %q, want prometheus", v.Name, q)
		}
	}
	if vars["datasource"] != "datasource" || vars["job"] != "query" {
		t.Errorf("want a datasource variable and a job variable, got %v", vars)
	}

	exported := exportedMetrics(t)
	var exprs []string
	ids := map[int]bool{}
	for _, p := range d.allPanels() {
		if ids[p.ID] {
			t.Errorf("panel id %d is used twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q: want the datasource ${datasource}", p.Title)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Datasource != nil && tg.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q: a query uses datasource %q", p.Title, tg.Datasource.UID)
			}
			if !strings.Contains(tg.Expr, `job="$job"`) {
				t.Errorf("panel %q: query %s does not select job=\"$job\"", p.Title, tg.Expr)
			}
			for _, m := range promqlMetrics(tg.Expr) {
				if !exported[m] {
					t.Errorf("panel %q reads %s, which the bridge does not export", p.Title, m)
				}
			}
			exprs = append(exprs, tg.Expr)
		}
	}
	all := strings.Join(exprs, "\n")
	for what, re := range map[string]string{
		"per-cell throughput": `sum by \(cell\) \(rate\(cellbridge_forwarded_total`,
		"latency quantiles":   `histogram_quantile\(0\.99, sum by \(le, cell\) \(rate\(cellbridge_latency_seconds_bucket`,
		"freshness":           `cellbridge_oldest_unacked_age_seconds`,
		"dead letters":        `cellbridge_dlq_total`,
		"held messages":       `cellbridge_held_messages`,
		"duplicates":          `cellbridge_messages_total\{[^}]*outcome="duplicate"`,
		"in-flight":           `cellbridge_in_flight`,
		"rules version":       `cellbridge_rules_version`,
		"reload failures":     `cellbridge_rules_reload_failures_total`,
		"readiness":           `cellbridge_ready`,
	} {
		if !regexp.MustCompile(re).MatchString(all) {
			t.Errorf("the dashboard shows no %s", what)
		}
	}

	// Every metric the bridge exports is on the dashboard: a new one without a panel fails here.
	read := map[string]bool{}
	for _, e := range exprs {
		for _, m := range promqlMetrics(e) {
			read[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_sum"), "_count")] = true
		}
	}
	for _, md := range bridge.MetricList {
		if !read[md.Name] {
			t.Errorf("no panel shows %s (every metric of bridge.MetricList needs one)", md.Name)
		}
	}

	// promtool parses every query: as recording rules, with the variables filled in.
	promtool(t)
	var rf ruleFile
	g := ruleGroup{Name: "dashboard"}
	for i, e := range exprs {
		g.Rules = append(g.Rules, rule{Record: fmt.Sprintf("dashboard:query_%d", i), Expr: grafanaVars.Replace(e)})
	}
	rf.Groups = []ruleGroup{g}
	runPromtool(t, "check", "rules", writeYAML(t, "dashboard.rules.yaml", rf))
}
