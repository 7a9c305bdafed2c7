# cellbridge container image: `make image` (docker build -t cellbridge:VERSION .).
#
# Build stage: a static binary (no cgo, so it runs on an image without libc), with paths trimmed so
# the binary does not carry the build machine's directories.
FROM golang:1.26 AS build
WORKDIR /src
# Modules first: this layer is reused while go.mod and go.sum stay the same.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
      -o /out/cellbridge ./cmd/cellbridge \
 && mkdir -p /out/data

# Runtime stage: distroless static, no shell, no package manager; its nonroot user is 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/cellbridge /usr/local/bin/cellbridge
# The data directory (-data) owned by the runtime user; Kubernetes mounts an emptyDir over it.
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
# /metrics, /healthz, /readyz, /route, /status (http.listen in the config).
EXPOSE 9090
# The binary is the entrypoint, so `docker run IMAGE validate /rules` works too; the default command
# runs the bridge with the config that deploy/ mounts. deploy/base/deployment.yaml repeats these args.
ENTRYPOINT ["/usr/local/bin/cellbridge"]
CMD ["run", "-config", "/etc/cellbridge/config.yaml", "-data", "/data"]
