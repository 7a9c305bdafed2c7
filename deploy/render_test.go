package deploy

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// overlays are the installations deploy/ ships; every one must render and pass every check.
var overlays = []string{"overlays/single-region", "overlays/production"}

// serviceMonitor is the part of monitoring.coreos.com/v1 ServiceMonitor that deploy/ uses. Decoding is
// strict, so a field that is not listed here (a typo, or a field this file does not know) fails the test.
type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		JobLabel          string               `json:"jobLabel,omitempty"`
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector *struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector,omitempty"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path,omitempty"`
			Interval      string `json:"interval,omitempty"`
			ScrapeTimeout string `json:"scrapeTimeout,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// prometheusRule is the part of monitoring.coreos.com/v1 PrometheusRule that deploy/ uses.
type prometheusRule struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              ruleFile `json:"spec"`
}

// ruleFile is a Prometheus rule file (and a PrometheusRule's spec).
type ruleFile struct {
	Groups []ruleGroup `json:"groups" yaml:"groups"`
}

type ruleGroup struct {
	Name     string `json:"name" yaml:"name"`
	Interval string `json:"interval,omitempty" yaml:"interval,omitempty"`
	Rules    []rule `json:"rules" yaml:"rules"`
}

type rule struct {
	Alert         string            `json:"alert,omitempty" yaml:"alert,omitempty"`
	Record        string            `json:"record,omitempty" yaml:"record,omitempty"`
	Expr          string            `json:"expr" yaml:"expr"`
	For           string            `json:"for,omitempty" yaml:"for,omitempty"`
	KeepFiringFor string            `json:"keep_firing_for,omitempty" yaml:"keep_firing_for,omitempty"`
	Labels        map[string]string `json:"labels,omitempty" yaml:"labels,omitempty"`
	Annotations   map[string]string `json:"annotations,omitempty" yaml:"annotations,omitempty"`
}

// rendering is one overlay's output, every object decoded into its type.
type rendering struct {
	dir        string
	namespace  *corev1.Namespace
	deployment *appsv1.Deployment
	service    *corev1.Service
	account    *corev1.ServiceAccount
	pdb        *policyv1.PodDisruptionBudget
	hpa        *autoscalingv2.HorizontalPodAutoscaler // nil when the overlay has none
	configMaps map[string]*corev1.ConfigMap           // by rendered name
	monitor    *serviceMonitor
	rules      *prometheusRule
}

var (
	renderMu    sync.Mutex
	renderCache = map[string]*rendering{}
)

// render builds an overlay with kustomize's Go API (the same code as `kubectl kustomize`), once per test
// binary, and decodes every object strictly: unknown or misspelt fields, and kinds this test does not
// know, fail.
func render(t *testing.T, dir string) *rendering {
	t.Helper()
	renderMu.Lock()
	defer renderMu.Unlock()
	if r, ok := renderCache[dir]; ok {
		return r
	}
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	r := &rendering{dir: dir, configMaps: map[string]*corev1.ConfigMap{}}
	for _, res := range m.Resources() {
		raw, err := res.MarshalJSON()
		if err != nil {
			t.Fatalf("%s: %s: %v", dir, res.CurId(), err)
		}
		kind := res.GetKind()
		var obj any
		switch kind {
		case "Namespace":
			obj = once(t, &r.namespace, kind)
		case "Deployment":
			obj = once(t, &r.deployment, kind)
		case "Service":
			obj = once(t, &r.service, kind)
		case "ServiceAccount":
			obj = once(t, &r.account, kind)
		case "PodDisruptionBudget":
			obj = once(t, &r.pdb, kind)
		case "HorizontalPodAutoscaler":
			obj = once(t, &r.hpa, kind)
		case "ServiceMonitor":
			obj = once(t, &r.monitor, kind)
		case "PrometheusRule":
			obj = once(t, &r.rules, kind)
		case "ConfigMap":
			cm := &corev1.ConfigMap{}
			r.configMaps[res.GetName()] = cm
			obj = cm
		default:
			t.Fatalf("%s renders a %s, which this test does not check", dir, kind)
		}
		if err := decodeStrict(raw, obj); err != nil {
			t.Fatalf("%s: %s %s: %v", dir, kind, res.GetName(), err)
		}
	}
	for kind, missing := range map[string]bool{
		"Namespace": r.namespace == nil, "Deployment": r.deployment == nil, "Service": r.service == nil,
		"ServiceAccount": r.account == nil, "PodDisruptionBudget": r.pdb == nil,
		"ServiceMonitor": r.monitor == nil, "PrometheusRule": r.rules == nil,
	} {
		if missing {
			t.Fatalf("%s renders no %s", dir, kind)
		}
	}
	renderCache[dir] = r
	return r
}

// once allocates *p, failing when the overlay renders a second object of that kind.
func once[T any](t *testing.T, p **T, kind string) *T {
	t.Helper()
	if *p != nil {
		t.Fatalf("more than one %s", kind)
	}
	*p = new(T)
	return *p
}

// decodeStrict decodes JSON the way the API server's strict field validation does: case-sensitive,
// unknown and duplicate fields are errors.
func decodeStrict(raw []byte, obj any) error {
	strict, err := sigsjson.UnmarshalStrict(raw, obj, sigsjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	if len(strict) > 0 {
		return fmt.Errorf("strict decoding: %v", strict)
	}
	return nil
}

// forEachOverlay runs f as a parallel subtest per overlay.
func forEachOverlay(t *testing.T, f func(t *testing.T, r *rendering)) {
	for _, dir := range overlays {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			f(t, render(t, dir))
		})
	}
}

// TestOverlaysExist keeps the overlays list equal to the directories under deploy/overlays, so that a
// new overlay cannot skip the checks.
func TestOverlaysExist(t *testing.T) {
	entries, err := os.ReadDir("overlays")
	if err != nil {
		t.Fatal(err)
	}
	var dirs []string
	for _, e := range entries {
		if e.IsDir() {
			dirs = append(dirs, "overlays/"+e.Name())
		}
	}
	if !slices.Equal(dirs, slices.Sorted(slices.Values(overlays))) {
		t.Fatalf("deploy/overlays has %v, the tests check %v", dirs, overlays)
	}
}

// TestNamespaced checks that every namespaced object lands in the overlay's namespace.
func TestNamespaced(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		ns := r.namespace.Name
		metas := map[string]metav1.ObjectMeta{
			"Deployment": r.deployment.ObjectMeta, "Service": r.service.ObjectMeta,
			"ServiceAccount": r.account.ObjectMeta, "PodDisruptionBudget": r.pdb.ObjectMeta,
			"ServiceMonitor": r.monitor.ObjectMeta, "PrometheusRule": r.rules.ObjectMeta,
		}
		if r.hpa != nil {
			metas["HorizontalPodAutoscaler"] = r.hpa.ObjectMeta
		}
		for name, cm := range r.configMaps {
			metas["ConfigMap "+name] = cm.ObjectMeta
		}
		for what, m := range metas {
			if m.Namespace != ns {
				t.Errorf("%s %s is in namespace %q, want %q", what, m.Name, m.Namespace, ns)
			}
		}
	})
}

// container returns the bridge container of the Deployment.
func container(t *testing.T, r *rendering) *corev1.Container {
	t.Helper()
	cs := r.deployment.Spec.Template.Spec.Containers
	if len(cs) != 1 || cs[0].Name != "cellbridge" {
		t.Fatalf("want one container named cellbridge, got %d", len(cs))
	}
	return &cs[0]
}

// argValue returns the value following flag in args ("" when absent).
func argValue(args []string, flag string) string {
	i := slices.Index(args, flag)
	if i < 0 || i+1 >= len(args) {
		return ""
	}
	return args[i+1]
}

// mountFor returns the volume mount whose directory holds path (the longest match), or nil.
func mountFor(c *corev1.Container, path string) *corev1.VolumeMount {
	var best *corev1.VolumeMount
	for i := range c.VolumeMounts {
		m := &c.VolumeMounts[i]
		if strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/") &&
			(best == nil || len(m.MountPath) > len(best.MountPath)) {
			best = m
		}
	}
	return best
}

// volume returns the pod volume called name, or nil.
func volume(r *rendering, name string) *corev1.Volume {
	for i, v := range r.deployment.Spec.Template.Spec.Volumes {
		if v.Name == name {
			return &r.deployment.Spec.Template.Spec.Volumes[i]
		}
	}
	return nil
}
