package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
)

var (
	brokerNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)
	bucketRE     = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
)

// Validate checks every field and returns Errors listing every problem, or
// nil. It reads nothing but the rule directory's entry and the files broker
// settings name; rule cross-checks are in CheckRules.
func (c *Config) Validate() error {
	var errs Errors
	badAt := func(line int, field, format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		if flag := c.flags[field]; flag != "" {
			msg += " (set by " + flag + ")"
		}
		errs = append(errs, Problem{File: c.File, Line: line, Field: field, Msg: msg})
	}
	bad := func(field, format string, args ...any) { badAt(c.line(field), field, format, args...) }

	if c.Rules == "" && !c.Embedded() {
		bad("rules", "required when brokers are configured (the rule directory)")
	} else if c.Rules != "" {
		if st, err := os.Stat(string(c.Rules)); err != nil {
			bad("rules", "rule directory: %v", unwrapPathErr(err))
		} else if !st.IsDir() {
			bad("rules", "%s is not a directory", c.Rules)
		}
	}

	c.validateBrokers(bad)
	c.validateDedupe(bad, badAt)
	c.validateOrdering(bad)
	c.validateDeployment(bad)

	if _, port, err := net.SplitHostPort(c.HTTP.Listen); err != nil {
		bad("http.listen", "want host:port or :port, got %q", c.HTTP.Listen)
	} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		bad("http.listen", "invalid port %q", port)
	}

	// The pipeline's bounds are the pipeline's own (bridge.Config.Validate):
	// written once, for this file and for every other caller of bridge.New.
	var fe bridge.ConfigErrors
	if errors.As(c.Pipeline.Bridge().Validate(), &fe) {
		for _, f := range fe {
			bad("pipeline."+f.Field, "%s", f.Msg)
		}
	}

	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "unknown level %q (want debug, info, warn or error)", c.Log.Level)
	}
	switch c.Log.Format {
	case "auto", "json", "text":
	default:
		bad("log.format", "unknown format %q (want auto, json or text)", c.Log.Format)
	}

	if len(errs) == 0 {
		return nil
	}
	sort.SliceStable(errs, func(i, j int) bool { return errs[i].Line < errs[j].Line })
	return errs
}

func (c *Config) validateDedupe(bad func(field, format string, args ...any), badAt func(line int, field, format string, args ...any)) {
	d := c.Dedupe
	switch d.Store {
	case DedupeJetStream:
		if c.set("dedupe.size") {
			bad("dedupe.size", "only valid for store memory")
		}
		switch b := c.Brokers[d.Broker]; {
		case c.Embedded():
			if d.Broker != EmbeddedBroker {
				bad("dedupe.broker", "the embedded default has only the broker %q, not %q", EmbeddedBroker, d.Broker)
			}
		case d.Broker == "":
			// A store chosen by default was chosen for the brokers: name
			// their line when the dedupe section does not say more.
			line, why := c.line("dedupe.broker"), ""
			if !c.set("dedupe.store") {
				why = " (the store is jetstream by default when a RocketMQ broker is configured: its targets have no duplicate window)"
				if line == 0 {
					line = c.line("brokers")
				}
			}
			badAt(line, "dedupe.broker", "required for store jetstream when there is no broker named \"nats\" or several NATS brokers: name one of %s%s",
				strings.Join(c.natsBrokerNames(), ", "), why)
		case b == nil:
			bad("dedupe.broker", "unknown broker %q (brokers: %s)", d.Broker, strings.Join(c.brokerNames(), ", "))
		case b.Type != NATSType:
			bad("dedupe.broker", "broker %q is of type %s; the jetstream store needs a %s broker", d.Broker, b.Type, NATSType)
		}
		if !bucketRE.MatchString(d.Bucket) {
			bad("dedupe.bucket", "invalid KV bucket name %q (letters, digits, '_' and '-')", d.Bucket)
		}
		if d.Replicas < 1 || d.Replicas > 5 {
			bad("dedupe.replicas", "must be 1..5, got %d", d.Replicas)
		}
		if d.Protocol != ProtocolReserve && d.Protocol != ProtocolCheck {
			bad("dedupe.protocol", "unknown protocol %q (want reserve or check)", d.Protocol)
		} else if d.Protocol == ProtocolCheck && d.Replicas != 1 {
			bad("dedupe.protocol", "check needs dedupe.replicas: 1 (a lagging replica of the bucket could answer a read and miss a commit; use reserve with a replicated bucket), got replicas %d", d.Replicas)
		}
		if d.RequestTimeout.D() < 10*time.Millisecond {
			bad("dedupe.requestTimeout", "must be at least 10ms, got %s", d.RequestTimeout)
		} else if d.RequestTimeout.D() >= d.ReserveTTL.D() {
			bad("dedupe.requestTimeout", "must be less than dedupe.reserveTTL (%s): a reservation must outlive the requests that hold it, got %s", d.ReserveTTL, d.RequestTimeout)
		}
	case DedupeMemory:
		hint := ""
		if !c.set("dedupe.store") {
			hint = " (the store is memory by default when every broker is NATS; write store: jetstream to use a KV bucket)"
		}
		for _, f := range []string{"broker", "bucket", "replicas", "requestTimeout", "protocol"} {
			if c.set("dedupe." + f) {
				bad("dedupe."+f, "only valid for store jetstream%s", hint)
			}
		}
		if d.Size < 1 {
			bad("dedupe.size", "must be positive, got %d", d.Size)
		}
		for _, name := range c.brokerNames() {
			b := c.Brokers[name]
			if b == nil {
				continue // reported where brokers are checked
			}
			if u, ok := b.Settings.(SharedStoreUser); ok {
				if why := u.SharedStoreNeed(); why != "" {
					bad("dedupe.store", "broker %q %s, which the memory store (each process's own) cannot give; write store: jetstream with a NATS broker for the KV bucket%s", name, why, hint)
				}
			}
		}
	default:
		bad("dedupe.store", "unknown store %q (want jetstream or memory)", d.Store)
	}
	if d.TTL.D() < time.Second {
		bad("dedupe.ttl", "must be at least 1s, got %s", d.TTL)
	}
	if d.ReserveTTL.D() < 100*time.Millisecond {
		bad("dedupe.reserveTTL", "must be at least 100ms, got %s", d.ReserveTTL)
	}
	// The KV store's per-message TTL counts whole seconds: compare rounded up.
	if rounded := (d.ReserveTTL.D() + time.Second - 1).Truncate(time.Second); rounded >= d.TTL.D() {
		bad("dedupe.reserveTTL", "must be less than dedupe.ttl (%s) after rounding up to whole seconds, got %s", d.TTL, d.ReserveTTL)
	}
}

// replicaIDRE is what a replica id may hold: it is a token of the lease
// bucket's keys.
var replicaIDRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)

// validateOrdering checks the timing of ordered and partitioned sources
// (the bounds of natsjs SourceConfig.PinnedTTL and LeaseConfig).
func (c *Config) validateOrdering(bad func(field, format string, args ...any)) {
	if d := c.Ordering.PinnedTTL.D(); d < 2*time.Second {
		bad("ordering.pinnedTTL", "must be at least 2s (the pulls that keep the pin come every second or more), got %s", c.Ordering.PinnedTTL)
	}
	if d := c.Ordering.StallLimit.D(); d <= c.Pipeline.StallTimeout.D() || d < 2*c.Ordering.PinnedTTL.D() {
		bad("ordering.stallLimit", "must be above pipeline.stallTimeout (%s) and at least 2×ordering.pinnedTTL (%s), so that a replica that is only slow, or one that just took over, does not hand over; got %s",
			c.Pipeline.StallTimeout, Duration(2*c.Ordering.PinnedTTL.D()), c.Ordering.StallLimit)
	}
	p := c.Partitions
	if !bucketRE.MatchString(p.Bucket) {
		bad("partitions.bucket", "invalid KV bucket name %q (letters, digits, '_' and '-')", p.Bucket)
	}
	if p.LeaseTTL.D() < 2*time.Second {
		bad("partitions.leaseTTL", "must be at least 2s, got %s", p.LeaseTTL)
	}
	switch hb := p.Heartbeat.D(); {
	case hb < 100*time.Millisecond:
		bad("partitions.heartbeat", "must be at least 100ms, got %s", p.Heartbeat)
	case hb > p.LeaseTTL.D()/3:
		bad("partitions.heartbeat", "must be at most leaseTTL/3 (%s), so that two renewals in a row can fail before a lease expires; got %s",
			Duration(p.LeaseTTL.D()/3), p.Heartbeat)
	}
	if p.Replicas < 1 || p.Replicas > 5 {
		bad("partitions.replicas", "must be 1..5, got %d", p.Replicas)
	}
	if p.ReplicaID != "" && !replicaIDRE.MatchString(p.ReplicaID) {
		bad("partitions.replicaID", "invalid replica id %q (letters, digits, '_' and '-', at most 128)", p.ReplicaID)
	}
	if p.DrainTimeout.D() < 100*time.Millisecond {
		bad("partitions.drainTimeout", "must be at least 100ms, got %s", p.DrainTimeout)
	}
}
