package config

import (
	"regexp"
	"time"
)

// DeploymentConfig names the deployment a replica belongs to. Replicas of
// one deployment share its rules version: each publishes the version it
// runs, and none starts on a version lower than the highest the
// deployment has run (internal/app).
type DeploymentConfig struct {
	Name string `yaml:"name"`
}

// DefaultDeployment is deployment.name without a jetstream dedupe store.
const DefaultDeployment = "cellbridge"

// deploymentName is what a KV key token may hold.
var deploymentName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,100}$`)

// defaultDeployment computes deployment.name when the file did not set
// it: replicas that share a dedupe bucket are one deployment.
func (c *Config) defaultDeployment() {
	if c.Deployment.Name != "" {
		return
	}
	c.Deployment.Name = DefaultDeployment
	if c.Dedupe.Store == DedupeJetStream && c.Dedupe.Bucket != "" {
		c.Deployment.Name = c.Dedupe.Bucket
	}
}

func (c *Config) validateDeployment(bad func(field, format string, args ...any)) {
	if !deploymentName.MatchString(c.Deployment.Name) {
		bad("deployment.name", "%q: letters, digits, '_' and '-' only, at most 100", c.Deployment.Name)
	}
}

// RegistryBroker is the NATS broker whose lease bucket holds the rules
// versions of the deployment's replicas: the dedupe store's with the
// jetstream store, else the broker named nats or the only NATS broker (the
// embedded default's server); "" when there is none, and then nothing is
// published or checked.
func (c *Config) RegistryBroker() string {
	switch {
	case c.Dedupe.Store == DedupeJetStream && c.Dedupe.Broker != "":
		return c.Dedupe.Broker
	case c.Embedded():
		return EmbeddedBroker
	}
	return c.natsBrokerDefault()
}

// MinDuplicateWindow is the shortest duplicate window a stream that
// captures a target or DLQ subject may have (docs/guarantees.md, section
// 2): a repeat of a publish whose replica died comes after the dedupe
// reservation expired (dedupe.reserveTTL), after the source redelivered
// (pipeline.ackWait) and after the longest retry pause
// (pipeline.retry.max).
func (c *Config) MinDuplicateWindow() time.Duration {
	return c.Dedupe.ReserveTTL.D() + c.Pipeline.AckWait.D() + c.Pipeline.Retry.Max.D()
}

// HandOverWindow is how far back an ordered rule's re-read after a stall
// hand-over may reach without storing a copy twice (docs/guarantees.md,
// "Duplicates and the window"): every NATS target stream drops repeats for
// at least MinDuplicateWindow (the preflight refuses a shorter window at
// start), and the JetStream store keeps committed keys for dedupe.ttl. A
// target on another kind of broker (RocketMQ) has no window of its own:
// only the JetStream store protects it, for dedupe.ttl. Negative when a
// configured broker's targets have no protection at all (such a broker
// with the memory store): no re-read is safe.
func (c *Config) HandOverWindow() time.Duration {
	shared := c.Dedupe.Store == DedupeJetStream
	w := c.MinDuplicateWindow()
	if shared {
		w = max(w, c.Dedupe.TTL.D())
	}
	if c.hasNonNATSBroker() {
		if !shared {
			return -1
		}
		w = min(w, c.Dedupe.TTL.D())
	}
	return w
}

// StreamWindow is the duplicate window `cellbridge streams` and the
// embedded default give the streams they create: 2 minutes, or
// MinDuplicateWindow when that is longer.
func (c *Config) StreamWindow() time.Duration { return max(2*time.Minute, c.MinDuplicateWindow()) }
