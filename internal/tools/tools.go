//go:build tools

// Package tools pins modules that are used by tests, benchmarks and
// generators so that go.mod keeps them while the code that imports them
// grows. It is never built.
package tools

import (
	_ "github.com/ThreeDotsLabs/watermill"
	_ "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/jetstream"
	_ "github.com/apache/rocketmq-client-go/v2"
	_ "github.com/fsnotify/fsnotify"
	_ "github.com/nats-io/nats-server/v2/server"
	_ "github.com/nats-io/nats.go/jetstream"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/tidwall/gjson"
	_ "go.uber.org/fx"
	_ "go.uber.org/goleak"
	_ "gopkg.in/yaml.v3"
	_ "k8s.io/api/apps/v1"
	_ "sigs.k8s.io/kustomize/api/krusty"
)
