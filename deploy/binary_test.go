package deploy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
	corev1 "k8s.io/api/core/v1"

	"github.com/cellbridge/cellbridge/router"
)

var (
	binDir    string // holds the cellbridge binary built for these tests; removed by TestMain
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// cellbridgeBinary builds cmd/cellbridge once per test binary, with the Dockerfile's own build line:
// the tests run the binary the image ships.
func cellbridgeBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		// Stays the error if this function ends early (t.Fatal while reading the Dockerfile).
		buildErr = errors.New("building cellbridge failed in an earlier test")
		var err error
		if binDir, err = os.MkdirTemp("", "cellbridge-deploy-test-"); err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(binDir, "cellbridge")
		env, argv, err := dockerBuild(readDockerfile(t), builtVersion, binPath)
		if err != nil {
			buildErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		cmd.Dir = ".." // the Dockerfile builds in a copy of the repository root
		cmd.Env = append(os.Environ(), env...)
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("%s %s: %w\n%s", strings.Join(env, " "), strings.Join(argv, " "), err, out)
			return
		}
		buildErr = nil
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// podFS lays out, under a temporary root, the files the bridge container sees: every ConfigMap volume
// with its keys, every file the config names on a Secret volume (a generated CA certificate, since the
// real Secret is not in the manifests), and the emptyDirs. It returns the root, the config file path
// with every absolute path in it moved under the root, and the container's environment with a
// placeholder for every value that comes from a Secret.
func podFS(t *testing.T, r *rendering) (root, config string, env []string) {
	t.Helper()
	root = t.TempDir()
	c := container(t, r)
	for _, m := range c.VolumeMounts {
		dir := filepath.Join(root, m.MountPath)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		v := volume(r, m.Name)
		if v != nil && v.ConfigMap != nil {
			cm := r.configMaps[v.ConfigMap.Name]
			if cm == nil {
				t.Fatalf("volume %s: ConfigMap %s is not rendered", m.Name, v.ConfigMap.Name)
			}
			writeConfigMap(t, dir, cm)
		}
	}
	raw, _ := configOf(t, r)
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(raw), &doc); err != nil {
		t.Fatal(err)
	}
	var walk func(n *yaml.Node)
	walk = func(n *yaml.Node) {
		if n.Kind == yaml.ScalarNode && strings.HasPrefix(n.Value, "/") {
			p := filepath.Join(root, n.Value)
			if m := mountFor(c, n.Value); m != nil && volume(r, m.Name) != nil && volume(r, m.Name).Secret != nil {
				if err := os.WriteFile(p, testCACert(t), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			n.Value = p
		}
		for _, k := range n.Content {
			walk(k)
		}
	}
	walk(&doc)
	b, err := yaml.Marshal(&doc)
	if err != nil {
		t.Fatal(err)
	}
	config = filepath.Join(root, argValue(c.Args, "-config"))
	if err := os.WriteFile(config, b, 0o644); err != nil {
		t.Fatal(err)
	}
	env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil:
			env = append(env, e.Name+"=secret-from-"+e.ValueFrom.SecretKeyRef.Name)
		case e.ValueFrom == nil:
			env = append(env, e.Name+"="+e.Value)
		}
	}
	return root, config, env
}

// writeConfigMap writes a ConfigMap's keys into dir the way the kubelet does: the files live in a
// timestamped directory, ..data points at it, and each key is a symlink through ..data.
func writeConfigMap(t *testing.T, dir string, cm *corev1.ConfigMap) {
	t.Helper()
	files := map[string][]byte{}
	for k, v := range cm.Data {
		files[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		files[k] = v
	}
	atomicWrite(t, dir, files)
}

var atomicSeq int

// atomicWrite reproduces the kubelet's atomic writer: new files in a fresh ..<timestamp> directory, a
// ..data_tmp symlink to it renamed over ..data (the one atomic step a watcher sees), user-visible
// symlinks for new keys, stale ones removed, then the old directory deleted.
func atomicWrite(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	atomicSeq++
	ts := fmt.Sprintf("..%s.%d", time.Now().UTC().Format("2006_01_02_15_04_05"), atomicSeq)
	if err := os.Mkdir(filepath.Join(dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	for k, v := range files {
		if err := os.WriteFile(filepath.Join(dir, ts, k), v, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old, _ := os.Readlink(filepath.Join(dir, "..data"))
	tmp := filepath.Join(dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	for k := range files {
		link := filepath.Join(dir, k)
		if _, err := os.Lstat(link); err == nil {
			continue
		}
		if err := os.Symlink(filepath.Join("..data", k), link); err != nil {
			t.Fatal(err)
		}
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if n := e.Name(); !strings.HasPrefix(n, "..") {
			if _, ok := files[n]; !ok {
				os.Remove(filepath.Join(dir, n))
			}
		}
	}
	if old != "" {
		os.RemoveAll(filepath.Join(dir, old))
	}
}

var (
	pkiOnce    sync.Once
	caPEM      []byte
	serverCert tls.Certificate
)

// testPKI makes a CA (standing in for a Secret's ca.crt) and a server certificate for 127.0.0.1 that it
// signed, for a TLS-enabled test NATS server.
func testPKI(t *testing.T) (ca []byte, server tls.Certificate) {
	t.Helper()
	pkiOnce.Do(func() {
		must := func(err error) {
			if err != nil {
				panic(err)
			}
		}
		caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		must(err)
		caTmpl := &x509.Certificate{
			SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cellbridge deploy test CA"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		}
		caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
		must(err)
		caCert, err := x509.ParseCertificate(caDER)
		must(err)
		caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})

		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		must(err)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "nats"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"localhost"},
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		must(err)
		serverCert = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	})
	return caPEM, serverCert
}

func testCACert(t *testing.T) []byte {
	ca, _ := testPKI(t)
	return ca
}

// runCellbridge runs the binary to completion and returns its exit code and output.
func runCellbridge(t *testing.T, env []string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cellbridgeBinary(t), args...)
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), out.String()
	} else if err != nil {
		t.Fatalf("cellbridge %s: %v", strings.Join(args, " "), err)
	}
	return 0, out.String()
}

// TestConfigPassesBridgeCheck runs `cellbridge run -check` on each overlay's config and rules, laid
// out as the container sees them: the bridge's own strict parser accepts the config, every ${VAR}
// resolves from the environment the Deployment sets, every file it names exists, and the rules agree
// with the brokers.
func TestConfigPassesBridgeCheck(t *testing.T) {
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		_, config, env := podFS(t, r)
		code, out := runCellbridge(t, env, "run", "-config", config, "-check")
		if code != 0 || !strings.HasPrefix(out, "ok:") {
			t.Fatalf("cellbridge run -check: exit %d\n%s", code, out)
		}
		t.Log(strings.TrimSpace(out))
	})
}

// TestRulesConfigMapIsValid: the rules ConfigMap, written out as the kubelet writes it, loads with the
// router and passes `cellbridge validate`, and holds exactly the example rules plus the overlay's own
// rule files (its rules/ directory, merged into the ConfigMap by its kustomization).
func TestRulesConfigMapIsValid(t *testing.T) {
	src, err := router.Load(rulesSrcDir)
	if err != nil {
		t.Fatalf("deploy/rules: %v", err)
	}
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		cm := r.configMaps[rulesCMName]
		if cm == nil {
			t.Fatalf("no ConfigMap %s", rulesCMName)
		}
		dir := t.TempDir()
		writeConfigMap(t, dir, cm)
		table, err := router.Load(dir)
		if err != nil {
			t.Fatalf("router.Load of the rules ConfigMap: %v", err)
		}
		if table.Version() != src.Version() {
			t.Errorf("ConfigMap rules version %d, deploy/rules has %d", table.Version(), src.Version())
		}
		names, err := ruleFiles(rulesSrcDir)
		if err != nil {
			t.Fatal(err)
		}
		srcOf := map[string]string{}
		for _, n := range names {
			srcOf[n] = filepath.Join(rulesSrcDir, n)
		}
		own := filepath.Join(r.dir, "rules")
		if extra, err := ruleFiles(own); err == nil {
			for _, n := range extra {
				if srcOf[n] != "" {
					t.Errorf("%s/%s would replace deploy/rules/%s", own, n, n)
				}
				srcOf[n] = filepath.Join(own, n)
				names = append(names, n)
			}
			sort.Strings(names)
		}
		var keys []string
		for k := range cm.Data {
			keys = append(keys, k)
			want, _ := os.ReadFile(srcOf[k])
			if srcOf[k] == "" || string(want) != cm.Data[k] {
				t.Errorf("ConfigMap key %s differs from %s", k, srcOf[k])
			}
		}
		sort.Strings(keys)
		if strings.Join(keys, ",") != strings.Join(names, ",") {
			t.Errorf("ConfigMap keys %v, want %v (deploy/rules and the overlay's rules/)", keys, names)
		}
		if code, out := runCellbridge(t, os.Environ(), "validate", dir); code != 0 {
			t.Errorf("cellbridge validate: exit %d\n%s", code, out)
		}
	})
}
