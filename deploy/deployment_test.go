package deploy

import (
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// configOf returns the config file the Deployment's container reads: the -config argument, resolved
// through its volume mount to the ConfigMap key, and parsed by the bridge's own parser (package
// internal/config, with the broker kinds of internal/app) without resolving ${VAR} references and
// file: secrets, which exist only in the pod. Its defaults are applied.
func configOf(t *testing.T, r *rendering) (raw string, cfg *config.Config) {
	t.Helper()
	c := container(t, r)
	path := argValue(c.Args, "-config")
	if path == "" {
		t.Fatalf("container args %q have no -config", c.Args)
	}
	m := mountFor(c, path)
	if m == nil {
		t.Fatalf("-config %s is on no volume mount", path)
	}
	v := volume(r, m.Name)
	if v == nil || v.ConfigMap == nil {
		t.Fatalf("-config %s: volume %s is not a ConfigMap", path, m.Name)
	}
	cm := r.configMaps[v.ConfigMap.Name]
	if cm == nil {
		t.Fatalf("volume %s refers to ConfigMap %s, which the overlay does not render", m.Name, v.ConfigMap.Name)
	}
	key := strings.TrimPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/")
	raw, ok := cm.Data[key]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %s (for -config %s)", cm.Name, key, path)
	}
	cfg, err := config.ParseTemplate(path, []byte(raw))
	if err != nil {
		t.Fatalf("ConfigMap %s key %s:\n%v", cm.Name, key, err)
	}
	return raw, cfg
}

// TestDeploymentProbes: liveness on /healthz and readiness on /readyz, on the port the bridge listens on.
func TestDeploymentProbes(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		c := container(t, r)
		_, cfg := configOf(t, r)
		listen := cfg.HTTP.Listen
		_, portStr, ok := strings.Cut(listen, ":")
		port, err := strconv.Atoi(portStr)
		if !ok || err != nil {
			t.Fatalf("http.listen %q has no port", listen)
		}
		check := func(what string, p *corev1.Probe, path string) {
			t.Helper()
			if p == nil || p.HTTPGet == nil {
				t.Errorf("%s probe: want an HTTP GET of %s", what, path)
				return
			}
			if p.HTTPGet.Path != path {
				t.Errorf("%s probe path %s, want %s", what, p.HTTPGet.Path, path)
			}
			if got := containerPort(c, p.HTTPGet.Port.String()); got != int32(port) {
				t.Errorf("%s probe port %s is %d, the bridge listens on %d", what, p.HTTPGet.Port.String(), got, port)
			}
			if p.TimeoutSeconds < 1 || p.PeriodSeconds < 1 || p.FailureThreshold < 1 {
				t.Errorf("%s probe: set timeoutSeconds, periodSeconds and failureThreshold explicitly", what)
			}
		}
		check("liveness", c.LivenessProbe, "/healthz")
		check("readiness", c.ReadinessProbe, "/readyz")
		if c.StartupProbe != nil {
			check("startup", c.StartupProbe, "/healthz")
		}
		for _, p := range probePaths(c) {
			if !slices.Contains(servedPaths, p) {
				t.Errorf("a probe requests %s, which the bridge does not serve (%v)", p, servedPaths)
			}
		}
	})
}

// servedPaths are the HTTP paths of the bridge that probes may use (the HTTP contract).
var servedPaths = []string{"/healthz", "/readyz"}

func probePaths(c *corev1.Container) []string {
	var paths []string
	for _, p := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
		if p != nil && p.HTTPGet != nil {
			paths = append(paths, p.HTTPGet.Path)
		}
	}
	return paths
}

// containerPort resolves a probe/service port (a name or a number) to the container's port number, or 0.
func containerPort(c *corev1.Container, port string) int32 {
	for _, p := range c.Ports {
		if p.Name == port || strconv.Itoa(int(p.ContainerPort)) == port {
			return p.ContainerPort
		}
	}
	return 0
}

// TestGracefulShutdown: the kubelet must not kill the bridge while it stops. After the preStop pause
// the bridge gets SIGTERM, then has pipeline.drainTimeout to finish in-flight messages and stops for
// good within app.StopTimeout (the drain plus closing everything else); terminationGracePeriodSeconds
// covers all of it, with a margin.
func TestGracefulShutdown(t *testing.T) {
	const margin = 5 * time.Second
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		c := container(t, r)
		_, cfg := configOf(t, r)
		stop := app.StopTimeout(cfg)
		var pause time.Duration
		if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
			t.Errorf("want a preStop sleep action (the image has no shell)")
		} else {
			pause = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
			if pause <= 0 {
				t.Errorf("preStop sleep of %v", pause)
			}
		}
		gp := r.deployment.Spec.Template.Spec.TerminationGracePeriodSeconds
		if gp == nil {
			t.Fatal("terminationGracePeriodSeconds is not set (the default 30s is not derived from the drain deadline)")
		}
		grace := time.Duration(*gp) * time.Second
		if need := pause + stop + margin; grace < need {
			t.Errorf("terminationGracePeriodSeconds %v < preStop %v + the bridge's stop bound %v (drainTimeout + 15s) + %v", grace, pause, stop, margin)
		}
		ru := r.deployment.Spec.Strategy.RollingUpdate
		if ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.String() != "0" {
			t.Errorf("rolling update: want maxUnavailable 0, so that consumption never pauses during a rollout")
		}
	})
}

// TestSecurityContext: non-root (the image's user), read-only root, no capabilities, RuntimeDefault
// seccomp, no privilege escalation, and no service-account token.
func TestSecurityContext(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		pod := r.deployment.Spec.Template.Spec
		psc := pod.SecurityContext
		if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
			t.Error("pod: want runAsNonRoot true")
		}
		if psc == nil || psc.RunAsUser == nil || *psc.RunAsUser != imageUID {
			t.Errorf("pod: want runAsUser %d (the image's USER)", imageUID)
		}
		if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
			t.Error("pod: want seccompProfile RuntimeDefault")
		}
		if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
			t.Error("pod: want automountServiceAccountToken false (the bridge never calls the API server)")
		}
		if r.account.AutomountServiceAccountToken == nil || *r.account.AutomountServiceAccountToken {
			t.Error("ServiceAccount: want automountServiceAccountToken false")
		}
		if pod.ServiceAccountName != r.account.Name {
			t.Errorf("pod uses ServiceAccount %q, the overlay renders %q", pod.ServiceAccountName, r.account.Name)
		}
		if pod.HostNetwork || pod.HostPID || pod.HostIPC {
			t.Error("pod: no host namespaces")
		}
		for _, c := range slices.Concat(pod.InitContainers, pod.Containers) {
			sc := c.SecurityContext
			if sc == nil {
				t.Errorf("container %s: no securityContext", c.Name)
				continue
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("container %s: want allowPrivilegeEscalation false", c.Name)
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Errorf("container %s: want readOnlyRootFilesystem true", c.Name)
			}
			if sc.Privileged != nil && *sc.Privileged {
				t.Errorf("container %s: privileged", c.Name)
			}
			if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
				t.Errorf("container %s: want capabilities drop [ALL] and nothing added", c.Name)
			}
			if sc.RunAsUser != nil && *sc.RunAsUser == 0 {
				t.Errorf("container %s: runs as root", c.Name)
			}
			for _, m := range c.VolumeMounts {
				v := volume(r, m.Name)
				if v == nil {
					t.Errorf("container %s mounts %s, which is no pod volume", c.Name, m.Name)
					continue
				}
				// With a read-only root filesystem, every path the bridge writes must be a volume.
				if v.EmptyDir == nil && !m.ReadOnly {
					t.Errorf("container %s: mount %s of a non-emptyDir volume should be readOnly", c.Name, m.Name)
				}
			}
		}
		c := container(t, r)
		if data := argValue(c.Args, "-data"); data != "" {
			m := mountFor(c, data+"/x")
			if m == nil || volume(r, m.Name).EmptyDir == nil {
				t.Errorf("-data %s must be on a writable emptyDir (the root filesystem is read-only)", data)
			}
		}
	})
}

// TestResources: requests and limits for CPU and memory, and GOMEMLIMIT below the memory limit.
func TestResources(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		c := container(t, r)
		for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
			req, okReq := c.Resources.Requests[res]
			lim, okLim := c.Resources.Limits[res]
			if !okReq || !okLim {
				t.Errorf("%s: want both a request and a limit", res)
				continue
			}
			if req.Cmp(lim) > 0 {
				t.Errorf("%s: request %s above limit %s", res, req.String(), lim.String())
			}
		}
		limit := c.Resources.Limits[corev1.ResourceMemory]
		var goMem string
		for _, e := range c.Env {
			if e.Name == "GOMEMLIMIT" {
				goMem = e.Value
			}
		}
		if goMem == "" {
			t.Fatal("want GOMEMLIMIT set below the memory limit, so that the GC works before the OOM killer does")
		}
		q, err := resource.ParseQuantity(strings.TrimSuffix(goMem, "B"))
		if err != nil {
			t.Fatalf("GOMEMLIMIT %q: %v", goMem, err)
		}
		if q.Cmp(limit) >= 0 || q.Value() < limit.Value()*8/10 {
			t.Errorf("GOMEMLIMIT %s should be 80-99%% of the memory limit %s", goMem, limit.String())
		}
	})
}

var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

// TestConfigAndSecrets: the config file parses, its rules directory is the rules ConfigMap mounted as a
// whole directory, every ${VAR} it uses is set from a Secret, every file it names is mounted, and no
// credential is written inline.
func TestConfigAndSecrets(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		c := container(t, r)
		raw, cfg := configOf(t, r)
		env := map[string]corev1.EnvVar{}
		for _, e := range c.Env {
			env[e.Name] = e
		}
		for _, m := range envRef.FindAllStringSubmatch(raw, -1) {
			e, ok := env[m[1]]
			switch {
			case !ok:
				t.Errorf("config uses ${%s}, which the container does not set", m[1])
			case e.Value != "" || e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil:
				t.Errorf("env %s: want it from a secretKeyRef", m[1])
			case e.ValueFrom.SecretKeyRef.Optional != nil && *e.ValueFrom.SecretKeyRef.Optional:
				t.Errorf("env %s: the Secret must not be optional (the bridge would start without credentials)", m[1])
			}
		}
		for _, field := range cfg.InlineSecrets() {
			t.Errorf("%s is written inline; use ${ENV} from a Secret or file:/path", field)
		}
		for name, b := range cfg.Brokers {
			for _, f := range b.Paths() {
				if m := mountFor(c, f); m == nil || volume(r, m.Name) == nil || volume(r, m.Name).Secret == nil {
					t.Errorf("brokers.%s names %s, which is on no Secret volume", name, f)
				}
			}
		}

		// The rules: a ConfigMap mounted as a directory (never subPath: a subPath mount does not see
		// updates), with a stable name so that an update changes the mounted files, not the pod.
		if !filepath.IsAbs(string(cfg.Rules)) {
			t.Fatalf("rules %q: want an absolute path (the mount)", cfg.Rules)
		}
		var rulesMount *corev1.VolumeMount
		for i, m := range c.VolumeMounts {
			if m.SubPath != "" || m.SubPathExpr != "" {
				t.Errorf("mount %s uses subPath; ConfigMap updates would not reach the pod", m.Name)
			}
			if filepath.Clean(m.MountPath) == filepath.Clean(string(cfg.Rules)) {
				rulesMount = &c.VolumeMounts[i]
			}
		}
		if rulesMount == nil {
			t.Fatalf("rules directory %s is not a volume mount", cfg.Rules)
		}
		v := volume(r, rulesMount.Name)
		if v == nil || v.ConfigMap == nil || v.ConfigMap.Name != rulesCMName || len(v.ConfigMap.Items) > 0 {
			t.Fatalf("rules mount %s: want the whole ConfigMap %s", rulesMount.Name, rulesCMName)
		}
		if _, ok := r.configMaps[rulesCMName]; !ok {
			t.Fatalf("the overlay renders no ConfigMap %s", rulesCMName)
		}
	})
}

// TestSelectorsAgree: the Service, the PodDisruptionBudget, the topology spread constraints and the
// ServiceMonitor all select what they are meant to.
func TestSelectorsAgree(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		pod := labels.Set(r.deployment.Spec.Template.Labels)
		matches := func(what string, sel *metav1.LabelSelector, set labels.Set) {
			t.Helper()
			s, err := metav1.LabelSelectorAsSelector(sel)
			if err != nil || s.Empty() || !s.Matches(set) {
				t.Errorf("%s selector %v does not match %v (err %v)", what, sel, set, err)
			}
		}
		matches("Deployment", r.deployment.Spec.Selector, pod)
		matches("PodDisruptionBudget", r.pdb.Spec.Selector, pod)
		for _, tsc := range r.deployment.Spec.Template.Spec.TopologySpreadConstraints {
			matches("topology spread "+tsc.TopologyKey, tsc.LabelSelector, pod)
		}
		if !labels.SelectorFromSet(r.service.Spec.Selector).Matches(pod) || len(r.service.Spec.Selector) == 0 {
			t.Errorf("Service selector %v does not match the pods %v", r.service.Spec.Selector, pod)
		}
		if !r.service.Spec.PublishNotReadyAddresses {
			t.Error("Service: want publishNotReadyAddresses, so that a not-ready bridge is still scraped")
		}
		c := container(t, r)
		svcPorts := map[string]corev1.ServicePort{}
		for _, p := range r.service.Spec.Ports {
			svcPorts[p.Name] = p
			if containerPort(c, p.TargetPort.String()) == 0 {
				t.Errorf("Service port %s targets %s, which the container does not expose", p.Name, p.TargetPort.String())
			}
		}
		matches("ServiceMonitor", &r.monitor.Spec.Selector, r.service.Labels)
		if len(r.monitor.Spec.Endpoints) == 0 {
			t.Fatal("ServiceMonitor has no endpoints")
		}
		for _, e := range r.monitor.Spec.Endpoints {
			if _, ok := svcPorts[e.Port]; !ok {
				t.Errorf("ServiceMonitor scrapes port %q, which the Service does not name", e.Port)
			}
			if e.Path != "/metrics" {
				t.Errorf("ServiceMonitor path %q, want /metrics", e.Path)
			}
		}
		// The alerts select job="cellbridge"; jobLabel takes the job from this Service label, whatever
		// an overlay names the Service.
		if r.monitor.Spec.JobLabel == "" || r.service.Labels[r.monitor.Spec.JobLabel] != alertJob {
			t.Errorf("ServiceMonitor jobLabel %q: the Service's value is %q, the alerts expect job=%q",
				r.monitor.Spec.JobLabel, r.service.Labels[r.monitor.Spec.JobLabel], alertJob)
		}
	})
}

// alertJob is the Prometheus job label the alert rules select.
const alertJob = "cellbridge"

// TestAvailability: enough replicas for the disruption budget to allow evictions, and the autoscaler
// (where there is one) owns the replica count and scales this Deployment.
func TestAvailability(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		d := r.deployment
		minReplicas := int32(1)
		if d.Spec.Replicas != nil {
			minReplicas = *d.Spec.Replicas
		}
		if r.hpa != nil {
			ref := r.hpa.Spec.ScaleTargetRef
			if ref.Kind != "Deployment" || ref.Name != d.Name || ref.APIVersion != "apps/v1" {
				t.Errorf("HPA scales %s %s/%s, not the Deployment %s", ref.Kind, ref.APIVersion, ref.Name, d.Name)
			}
			if d.Spec.Replicas != nil {
				t.Error("with an HPA the Deployment must not set replicas (every apply would reset the HPA's count)")
			}
			if r.hpa.Spec.MinReplicas == nil || r.hpa.Spec.MaxReplicas < *r.hpa.Spec.MinReplicas {
				t.Fatal("HPA: want minReplicas <= maxReplicas")
			}
			minReplicas = *r.hpa.Spec.MinReplicas
			if len(d.Spec.Template.Spec.TopologySpreadConstraints) == 0 {
				t.Error("a scaled installation should spread its replicas (topologySpreadConstraints)")
			}
		}
		if minReplicas < 2 {
			t.Errorf("%d replica(s): one eviction or crash stops routing", minReplicas)
		}
		pdb := r.pdb.Spec
		switch {
		case pdb.MaxUnavailable != nil:
			if pdb.MaxUnavailable.IntValue() < 1 && pdb.MaxUnavailable.Type == 0 {
				t.Error("PDB maxUnavailable 0 blocks every node drain")
			}
		case pdb.MinAvailable != nil:
			if pdb.MinAvailable.Type == 0 && int32(pdb.MinAvailable.IntValue()) >= minReplicas {
				t.Errorf("PDB minAvailable %d with %d replicas blocks every node drain", pdb.MinAvailable.IntValue(), minReplicas)
			}
		default:
			t.Error("PDB sets neither maxUnavailable nor minAvailable")
		}
	})
}

// TestReplicasFitPartitions: replicas beyond the largest partition count of the rules own nothing (an
// ordered rule with one consumer is forwarded by one replica whatever the count), so an autoscaler may
// add replicas only up to that count; a fixed replica count beyond it only adds standbys, which is fine
// for availability. A partitioned rule's count should be a multiple of the autoscaler's minimum, so that
// the first replicas share it evenly.
func TestReplicasFitPartitions(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		dir := t.TempDir()
		writeConfigMap(t, dir, r.configMaps[rulesCMName])
		table, err := router.Load(dir)
		if err != nil {
			t.Fatal(err)
		}
		largest := 0
		for _, rule := range table.Rules() {
			largest = max(largest, rule.Source.Partitions)
		}
		if r.hpa == nil {
			return
		}
		lo, hi := *r.hpa.Spec.MinReplicas, r.hpa.Spec.MaxReplicas
		switch {
		case largest == 0 && hi > lo:
			t.Errorf("HPA scales %d → %d replicas, but no rule is partitioned: every replica beyond the first of each rule is a standby", lo, hi)
		case largest > 0 && int(hi) > max(largest, int(lo)):
			t.Errorf("HPA maxReplicas %d exceeds the largest partition count %d: the replicas beyond it own nothing", hi, largest)
		case largest > 0 && largest%int(lo) != 0:
			t.Errorf("HPA minReplicas %d does not divide the partition count %d: the first replicas get unequal shares", lo, largest)
		}
		t.Logf("HPA %d → %d replicas; largest partition count %d", lo, hi, largest)
	})
}

// TestImage: a pinned tag (never latest), and the command line is the image's own (see Dockerfile).
func TestImage(t *testing.T) {
	df := readDockerfile(t)
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		c := container(t, r)
		name, tag, _ := strings.Cut(c.Image[strings.LastIndex(c.Image, "/")+1:], ":")
		if tag == "" && !strings.Contains(c.Image, "@sha256:") || tag == "latest" {
			t.Errorf("image %s: pin a tag or digest", c.Image)
		}
		if !strings.HasPrefix(name, "cellbridge") {
			t.Errorf("image %s is not cellbridge", c.Image)
		}
		if len(c.Command) > 0 {
			t.Errorf("command %q overrides the image's ENTRYPOINT", c.Command)
		}
		if !slices.Equal(c.Args, df.cmd) {
			t.Errorf("container args %q differ from the Dockerfile's CMD %q", c.Args, df.cmd)
		}
		for _, p := range c.Ports {
			if !slices.Contains(df.expose, fmt.Sprint(p.ContainerPort)) {
				t.Errorf("container port %d is not EXPOSEd by the Dockerfile (%v)", p.ContainerPort, df.expose)
			}
		}
	})
}
