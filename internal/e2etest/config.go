package e2etest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Config is what a test chooses of a bridge configuration; WriteConfig
// writes it as `cellbridge run` reads it. One NATS broker, named "nats", as
// the example rules expect.
type Config struct {
	// Rules is the rules directory.
	Rules string
	// URLs are the NATS servers (a cluster's URLs()).
	URLs []string
	// Dedupe is the dedupe: section as a YAML flow mapping, e.g.
	// "{store: jetstream, bucket: dedupe, replicas: 3}"; "" is the memory
	// store.
	Dedupe string
	// Pipeline is the pipeline: section as a YAML flow mapping; "" keeps
	// every default.
	Pipeline string
	// Ordering and Partitions are the ordering: and partitions: sections
	// (the timing of ordered and partitioned sources) as YAML flow
	// mappings, e.g. "{pinnedTTL: 2s}" and "{leaseTTL: 2s, replicas: 3}";
	// "" keeps every default.
	Ordering, Partitions string
	// Extra is appended as more top-level YAML.
	Extra string
	// Log is the log: section as a YAML flow mapping; default
	// "{level: info, format: json}".
	Log string
	// Broker holds more settings of the broker "nats" as entries of a YAML
	// flow mapping, e.g. "serverOrder: listed, ackTimeout: 2s"; "" keeps
	// every default.
	Broker string
}

// WriteConfig writes c as config.yaml in dir (default t.TempDir()) and
// returns its path. The log is JSON at level info unless c.Log says
// otherwise.
func WriteConfig(t testing.TB, dir string, c Config) string {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	if c.Dedupe == "" {
		c.Dedupe = "{store: memory}"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "rules: %q\n", c.Rules)
	broker := ""
	if c.Broker != "" {
		broker = ", " + c.Broker
	}
	fmt.Fprintf(&b, "brokers:\n  nats: {type: nats, url: %q%s}\n", strings.Join(c.URLs, ","), broker)
	fmt.Fprintf(&b, "dedupe: %s\n", c.Dedupe)
	for _, sec := range []struct{ name, body string }{{"pipeline", c.Pipeline}, {"ordering", c.Ordering}, {"partitions", c.Partitions}} {
		if sec.body != "" {
			fmt.Fprintf(&b, "%s: %s\n", sec.name, sec.body)
		}
	}
	if c.Log == "" {
		c.Log = "{level: info, format: json}"
	}
	fmt.Fprintf(&b, "log: %s\n", c.Log)
	if c.Extra != "" {
		b.WriteString(c.Extra + "\n")
	}
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
