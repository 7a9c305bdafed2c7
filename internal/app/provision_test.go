package app

import (
	"os"
	"strings"
	"testing"

	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// TestNeedsLeaseBucketReplicas: `cellbridge streams` plans the lease bucket
// with partitions.replicas, or with its -replicas when that is more, as it
// does the dedupe bucket: a bucket it makes is the one the replicas use.
func TestNeedsLeaseBucketReplicas(t *testing.T) {
	c, err := config.Parse("c.yaml", []byte("brokers:\n  nats: {type: nats, url: nats://a:1}\npartitions: {replicas: 3}\n"))
	if err != nil {
		t.Fatal(err)
	}
	// The production overlay's partitioned rule, with the example cell map.
	var rules []byte
	for _, f := range []string{"../../deploy/rules/cellmap.yaml", "../../deploy/overlays/production/rules/activity.yaml"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rules = append(append(rules, b...), "\n---\n"...)
	}
	table, err := router.Parse("rules.yaml", rules)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		flag int
		want string
	}{{0, "replicas 3"}, {1, "replicas 3"}, {5, "replicas 5"}} {
		settings := bucketSettings(t, c, table, tc.flag, c.Partitions.Bucket)
		if len(settings) != 1 || !strings.HasSuffix(settings[0], tc.want) {
			t.Errorf("-replicas %d: lease bucket plans %q, want one with %s", tc.flag, settings, tc.want)
		}
	}
}

// TestNeedsDedupeBucketReplicas: -replicas raises the dedupe bucket with
// protocol reserve, and leaves it at one replica with protocol check,
// whose reads any replica of the bucket could answer.
func TestNeedsDedupeBucketReplicas(t *testing.T) {
	b, err := os.ReadFile("../../deploy/rules/cellmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rules, err := os.ReadFile("../../deploy/rules/orders.yaml")
	if err != nil {
		t.Fatal(err)
	}
	table, err := router.Parse("rules.yaml", append(append(b, "\n---\n"...), rules...))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		protocol string
		want     string
	}{{"reserve", "replicas 3"}, {"check", "replicas 1"}} {
		c, err := config.Parse("c.yaml", []byte("brokers:\n  nats: {type: nats, url: nats://a:1}\ndedupe: {store: jetstream, protocol: "+tc.protocol+"}\n"))
		if err != nil {
			t.Fatal(err)
		}
		settings := bucketSettings(t, c, table, 3, c.Dedupe.Bucket)
		if len(settings) != 1 || !strings.HasSuffix(settings[0], tc.want) {
			t.Errorf("protocol %s, -replicas 3: dedupe bucket plans %q, want one with %s", tc.protocol, settings, tc.want)
		}
	}
}

// bucketSettings returns the planned settings of bucket in the needs of c
// and table with -replicas replicas.
func bucketSettings(t *testing.T, c *config.Config, table *router.Table, replicas int, bucket string) []string {
	t.Helper()
	needs, err := Needs(c, table, replicas)
	if err != nil {
		t.Fatal(err)
	}
	var settings []string
	for _, n := range needs {
		for _, b := range n.Buckets {
			if b.Bucket == bucket {
				settings = append(settings, b.Settings)
			}
		}
	}
	return settings
}
