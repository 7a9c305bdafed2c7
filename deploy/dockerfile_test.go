package deploy

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// imageUID is the runtime image's user (distroless "nonroot"); the pod's runAsUser must match it.
const imageUID = 65532

// dockerfile holds the facts of ../Dockerfile that the tests compare with the manifests.
type dockerfile struct {
	stages     []string // FROM lines
	user       string   // last USER
	entrypoint []string
	cmd        []string
	expose     []string
	lines      []string // instructions, continuation lines joined
}

func readDockerfile(t *testing.T) *dockerfile {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	df := &dockerfile{}
	var cur strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if s, ok := strings.CutSuffix(line, "\\"); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(line)
		df.lines = append(df.lines, cur.String())
		cur.Reset()
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	for _, l := range df.lines {
		instr, rest, _ := strings.Cut(l, " ")
		rest = strings.TrimSpace(rest)
		switch strings.ToUpper(instr) {
		case "FROM":
			df.stages = append(df.stages, rest)
		case "USER":
			df.user = rest
		case "EXPOSE":
			df.expose = append(df.expose, strings.Fields(rest)...)
		case "ENTRYPOINT", "CMD":
			var argv []string
			if err := json.Unmarshal([]byte(rest), &argv); err != nil {
				t.Fatalf("%s %s: want the exec (JSON) form, without a shell: %v", instr, rest, err)
			}
			if strings.EqualFold(instr, "CMD") {
				df.cmd = argv
			} else {
				df.entrypoint = argv
			}
		}
	}
	return df
}

// TestDockerfile checks the image's facts that a container engine would otherwise show: multi-stage,
// a static trimmed build, a minimal non-root runtime, no remote downloads, and a command line that
// matches the Deployment's (TestImage).
func TestDockerfile(t *testing.T) {
	df := readDockerfile(t)
	if len(df.stages) < 2 {
		t.Fatalf("want a multi-stage build, got FROM %v", df.stages)
	}
	if !strings.HasPrefix(df.stages[0], "golang:") {
		t.Errorf("build stage %q: want the golang image", df.stages[0])
	}
	runtime := strings.Fields(df.stages[len(df.stages)-1])[0]
	if !strings.HasPrefix(runtime, "gcr.io/distroless/static") && runtime != "scratch" {
		t.Errorf("runtime stage %q: want distroless static or scratch", runtime)
	}
	var build string
	for _, l := range df.lines {
		up := strings.ToUpper(l)
		if strings.HasPrefix(up, "ADD ") && regexp.MustCompile(`(?i)\s(https?|git)[:@]`).MatchString(l) {
			t.Errorf("%q downloads at build time; vendor it or COPY it", l)
		}
		if strings.HasPrefix(up, "RUN ") && strings.Contains(l, "go build") {
			build = l
		}
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "./cmd/cellbridge"} {
		if !strings.Contains(build, want) {
			t.Errorf("go build line %q lacks %s", build, want)
		}
	}
	uid, _, _ := strings.Cut(df.user, ":")
	if uid != "65532" && uid != "nonroot" {
		t.Errorf("USER %q: want 65532 (nonroot)", df.user)
	}
	if len(df.entrypoint) != 1 || filepath.Base(df.entrypoint[0]) != "cellbridge" {
		t.Errorf("ENTRYPOINT %q: want the cellbridge binary alone", df.entrypoint)
	}
	if len(df.cmd) < 3 || df.cmd[0] != "run" || argValue(df.cmd, "-config") == "" {
		t.Errorf("CMD %q: want run -config FILE", df.cmd)
	}
	if !slices.Contains(df.expose, "9090") {
		t.Errorf("EXPOSE %v: want the metrics port 9090", df.expose)
	}

	// The build context must keep what the build needs.
	ignore, err := os.ReadFile(filepath.Join("..", ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(ignore), "\n") {
		l = strings.TrimSpace(l)
		for _, needed := range []string{"go.mod", "go.sum", "cmd", "bridge", "router", "dedupe", "deploy", "internal", "deploy/rules"} {
			if l == needed || l == needed+"/" || l == "*" || l == "**" {
				t.Errorf(".dockerignore excludes %s, which the build needs", needed)
			}
		}
	}
}

// dockerBuild returns the Dockerfile's own `go build` command line (environment assignments, then the
// argv), with the ${VERSION} build argument set to version and -o pointing at out.
func dockerBuild(df *dockerfile, version, out string) (env, argv []string, err error) {
	var line string
	for _, l := range df.lines {
		if strings.HasPrefix(strings.ToUpper(l), "RUN ") && strings.Contains(l, "go build") {
			for _, part := range strings.Split(strings.TrimSpace(l[4:]), "&&") {
				if strings.Contains(part, "go build") {
					line = part
				}
			}
		}
	}
	words, err := shellWords(strings.ReplaceAll(line, "${VERSION}", version))
	if err != nil {
		return nil, nil, fmt.Errorf("go build line %q: %w", line, err)
	}
	for len(words) > 0 && strings.Contains(words[0], "=") {
		env = append(env, words[0])
		words = words[1:]
	}
	if len(words) < 2 || words[0] != "go" || words[1] != "build" {
		return nil, nil, fmt.Errorf("go build line %q: want VAR=... go build ...", line)
	}
	i := slices.Index(words, "-o")
	if i < 0 || i+1 >= len(words) {
		return nil, nil, fmt.Errorf("go build line %q has no -o", line)
	}
	words[i+1] = out
	return env, words, nil
}

// builtVersion is the version the tests' binary is built with (the Dockerfile's VERSION build arg).
const builtVersion = "deploy-test"

// TestDockerfileBuildsStaticBinary checks the binary that the Dockerfile's own `go build` line produces
// (cellbridgeBinary builds it that way; there is no container engine here) for what the distroless
// static image needs: statically linked (no ELF interpreter, no shared libraries), built with -trimpath
// (no build-machine paths inside), and reporting the version passed in through -ldflags.
func TestDockerfileBuildsStaticBinary(t *testing.T) {
	out := cellbridgeBinary(t)
	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the binary names an ELF interpreter: it is dynamically linked")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the binary needs shared libraries %v", libs)
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(bin, []byte(root+"/")) {
		t.Errorf("the binary contains the build directory %s: -trimpath missing", root)
	}
	v, err := exec.Command(out, "-version").CombinedOutput()
	if err != nil || !strings.Contains(string(v), builtVersion) {
		t.Errorf("cellbridge -version = %q (%v), want the -ldflags version %s", v, err, builtVersion)
	}
}

// shellWords splits a command line the way sh does for plain words and double- or single-quoted
// strings (enough for a Dockerfile RUN line; no expansions).
func shellWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	var quote rune
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '"' || r == '\'':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated %c quote", quote)
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}
