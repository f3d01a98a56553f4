# syntax=docker/dockerfile:1
# relaycar: one static binary on distroless, running as 65532 with a
# read-only root file system; the spool and outbox live on mounted volumes.
ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
COPY third_party/ third_party/
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=linux go build -trimpath \
      -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" \
      -o /out/relaycar ./cmd/relaycar \
 && mkdir -p /out/spool

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/relaycar /usr/local/bin/relaycar
# An empty, writable spool for `docker run` without a volume; Kubernetes
# mounts an emptyDir or PVC here.
COPY --from=build --chown=65532:65532 /out/spool /var/spool/relaycar
USER 65532:65532
WORKDIR /var/spool/relaycar
# `docker exec … relaycar queue ls` runs here, beside no relay.yaml.
ENV RELAYCAR_CONFIG=/etc/relaycar/relay.yaml
EXPOSE 2525 9025
ENTRYPOINT ["/usr/local/bin/relaycar"]
CMD ["serve", "--config", "/etc/relaycar/relay.yaml", "--log-format", "json"]
