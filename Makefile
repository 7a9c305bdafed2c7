# cellbridge — see README.md.
GO      ?= go
PKGS    ?= ./...
# The packages whose tests run longest go first (go test keeps the order given and runs two
# packages at a time on two cores): the cluster and crash tests then overlap with each other
# and with the short packages, instead of one of them running alone at the end.
SLOWPKGS := ./internal/e2etest ./bridge/natsjs ./cmd/cellbridge
TESTPKGS = $(if $(filter ./...,$(PKGS)),$(SLOWPKGS) $(PKGS),$(PKGS))
BIN     ?= bin/cellbridge
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: run test bench bench-short soak build image fmt vet clean

## run: start the bridge on an embedded NATS JetStream server with the example rules and a demo load
run:
	$(GO) run ./cmd/cellbridge demo

## test: gofmt check, go vet, and every test under the race detector
test:
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$bad" ]; then echo "gofmt needed:"; echo "$$bad"; exit 1; fi
	$(GO) vet $(PKGS)
	@# Every benchmark runs once, so that a broken one fails here, not in a measurement.
	@echo "$(GO) test -run '^$$' -bench . -benchtime 1x $(PKGS)"; \
	  out=$$($(GO) test -run '^$$' -bench . -benchtime 1x $(PKGS) 2>&1) || { echo "$$out"; exit 1; }
	@# Tests that need a missing tool (promtool) skip; go test shows a
	@# passing package's skips only with -v, so they are listed here.
	@echo "$(GO) test -race -timeout 30m $(TESTPKGS)"; skips=$$(mktemp); \
	  CELLBRIDGE_SKIP_LOG=$$skips $(GO) test -race -timeout 30m $(TESTPKGS); rc=$$?; \
	  cat $$skips; rm -f $$skips; exit $$rc

## bench: cellbridge as deployed (nats-server, the cellbridge binary and the load generator as separate processes)
## side by side with the bare pipe, watermill, the ordered, partitioned, KV, broadcast and RocketMQ variants, and
## the latency it adds; writes bench/results.json (under 6 minutes on 2 cores). SHORT=1: the quick run of bench-short.
bench:
ifeq ($(SHORT),1)
	$(GO) run ./cmd/cellbridge-bench -short
else
	$(GO) run ./cmd/cellbridge-bench -out bench/results.json
endif

## bench-short: one round of every variant on fewer events, latency at 30% only (under a minute); writes nothing
bench-short:
	$(GO) run ./cmd/cellbridge-bench -short

## soak: cellbridge at 30% of the pipe's rate (bench/results.json) for SOAK (default 10m), RSS and goroutines every minute
SOAK ?= 10m
soak:
	$(GO) run ./cmd/cellbridge-bench -soak $(SOAK)

## build: a static binary in bin/
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/cellbridge

## image: the container image (needs a container engine)
image:
	docker build --build-arg VERSION=$(VERSION) -t cellbridge:$(VERSION) .

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	$(GO) vet $(PKGS)

clean:
	rm -rf bin data
