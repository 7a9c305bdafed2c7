package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/fx"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/internal/deployment"
	"github.com/cellbridge/cellbridge/router"
)

// registry is this replica's entry in its deployment's registry of rules
// versions (natsjs.Registry in the lease bucket of the registry broker):
// before anything is consumed it refuses rules lower than the highest
// version the deployment has run (or that version with other files) and
// raises the highest to its own; while the bridge runs it publishes its
// record (deployment.Record: /status and who it is) every heartbeat and
// after each reload, for `cellbridge status` and `cellbridge switch`. It is
// inert without a NATS broker to hold the registry.
type registry struct {
	r       *natsjs.Registry
	started time.Time
}

func newRegistry(ctx startCtx, lc fx.Lifecycle, res *resources, o *Options, b *brokers, log *slog.Logger) (*registry, error) {
	reg := &registry{started: time.Now().UTC()}
	cfg := o.Config
	broker := RegistryBroker(cfg, o.Rules)
	if broker == "" {
		log.Info("no NATS broker the bridge connects for the deployment's registry: the rules version is not checked against the deployment's, nor published")
		return reg, nil
	}
	js, err := b.jetStream(broker)
	if err != nil {
		return nil, fmt.Errorf("deployment %s registry on broker %s: %w", cfg.Deployment.Name, broker, err)
	}
	// The registry shares the lease bucket of partitioned rules, and its
	// settings: a bucket created here has partitions.replicas replicas
	// and the partitions' TTL.
	r, err := natsjs.OpenRegistry(ctx, js, natsjs.RegistryConfig{Deployment: cfg.Deployment.Name, Leases: leaseConfig(cfg.Partitions)}, log)
	if err != nil {
		return nil, fmt.Errorf("deployment %s registry on broker %s: %w", cfg.Deployment.Name, broker, err)
	}
	if err := r.Claim(ctx, o.Rules.Version(), o.Rules.Fingerprint()); err != nil {
		var lower *natsjs.LowerVersionError
		if errors.As(err, &lower) {
			return nil, fmt.Errorf("rules %s: %w", o.RulesDir, err)
		}
		return nil, fmt.Errorf("deployment %s registry on broker %s: %w", cfg.Deployment.Name, broker, err)
	}
	res.add(lc, r.Close)
	reg.r = r
	log.Info("rules version checked against the deployment", "deployment", cfg.Deployment.Name, "version", o.Rules.Version(), "replica", r.ReplicaID())
	return reg, nil
}

// RegistryBroker is the broker whose registry the bridge publishes to
// with these rules: the configuration's RegistryBroker when the bridge
// connects to it (the rules or the dedupe store use it), else "" (none).
// `status` and `switch` read the registry where the replicas write it.
func RegistryBroker(cfg *config.Config, t *router.Table) string {
	if b := cfg.RegistryBroker(); brokerRoles(cfg, t)[b] != nil {
		return b
	}
	return ""
}

// start publishes the record from then on; it is the registry's part of
// the bridge's start (after the pipeline runs).
func (reg *registry) start(p *bridge.Pipeline, hs *httpServer) {
	if reg.r == nil {
		return
	}
	host, _ := os.Hostname()
	url := advertisedURL(hs.addr, host)
	reg.r.Start(func() []byte {
		b, _ := json.Marshal(deployment.Record{Status: p.Status(), Replica: reg.r.ReplicaID(), Host: host, HTTP: url, Started: reg.started})
		return b
	})
}

// reloaded raises the deployment's highest version to a reloaded table's
// and publishes the record at once. A reload below the highest is not an
// error here: replicas see a ConfigMap update at different moments, and a
// replica may load an intermediate version after another already ran a
// later one.
func (reg *registry) reloaded(t *router.Table, log *slog.Logger) {
	if reg == nil || reg.r == nil || t == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var lower *natsjs.LowerVersionError
	if err := reg.r.Claim(ctx, t.Version(), t.Fingerprint()); errors.As(err, &lower) {
		log.Info("reloaded rules are older than the deployment's newest; another replica runs a later version", "version", t.Version(), "highest", lower.Highest.Version)
	} else if err != nil {
		log.Warn("cannot record the reloaded rules version in the deployment's registry", "version", t.Version(), "err", err)
	}
	reg.r.Refresh()
}

// advertisedURL is the HTTP base URL of listen address addr as other hosts
// may reach it: an unspecified host is replaced by host.
func advertisedURL(addr, host string) string {
	h, port, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	if ip := net.ParseIP(h); h == "" || (ip != nil && ip.IsUnspecified()) {
		h = host
	}
	return "http://" + net.JoinHostPort(h, port)
}

// RegistrySource is the deployment.Source of cfg's deployment on a
// connection to its registry broker (ConnectBroker), in the lease bucket
// the partitions: section names.
func RegistrySource(cfg *config.Config, js jetstream.JetStream) *deployment.Registry {
	return &deployment.Registry{JetStream: js, Bucket: cfg.Partitions.Bucket, Deployment: cfg.Deployment.Name}
}
