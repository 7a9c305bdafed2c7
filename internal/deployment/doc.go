// Package deployment reads what the replicas of a deployment run: each
// replica's record (its rules version, whether a copy decided under an
// older version is still being published, what it holds per blocked shard
// range), from the registry in the lease bucket (natsjs.Registry, written
// by internal/app) or from the replicas' own /status; and it reads a
// bridge's HTTP endpoints (BridgeClient). `cellbridge status` lists a
// deployment with it, and `cellbridge switch` waits on it.
package deployment
