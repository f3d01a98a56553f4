# make test: everything CI runs. It installs what the tests need into
# .cache/ (the SES emulator from npm, helm built from the Go module proxy)
# and needs only Go, Node/npm and a shell.
GO ?= go
BIN ?= bin/relaycar
# staticcheck at a pinned version, installed into .cache/bin by test-deps.
STATICCHECK ?= $(CURDIR)/.cache/bin/staticcheck
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)

.PHONY: all build run test test-deps vet unit bench load chart-test demo clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/relaycar

run:
	$(GO) run ./cmd/relaycar serve --config relay.yaml

test-deps:
	./scripts/test-deps.sh

# As root the full-disk and memory-limit tests can run, so they must: their
# skips become failures (testwait.SkipUnprivileged). The integration tests
# run the binary built with -race (RELAYCAR_TEST_RACE), so a data race in
# the real process, not only in unit tests, turns the suite red.
test: test-deps vet
	RELAYCAR_TEST_RACE=1 RELAYCAR_REQUIRE_PRIVILEGED=$$([ "$$(id -u)" = 0 ] && echo 1) $(GO) test -race -count=1 -timeout 20m ./...
	@# upstream's TestServerAcceptErrorHandling races Serve against Close under load
	cd third_party/go-smtp && $(GO) test -race -count=1 -skip '^TestServerAcceptErrorHandling$$' ./...
	cd charts/tests && $(GO) vet ./... && HELM=$(CURDIR)/.cache/bin/helm $(GO) test -count=1 -timeout 10m ./...

vet:
	@fmt=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*')); \
	 if [ -n "$$fmt" ]; then echo "gofmt needed:"; echo "$$fmt"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

unit:
	$(GO) test -race -short ./...

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3000x ./relay/

load: build
	$(GO) run ./tools/loadgen

chart-test: test-deps
	cd charts/tests && HELM=$(CURDIR)/.cache/bin/helm $(GO) test -count=1 ./...

demo:
	$(GO) run ./examples/failover-demo

clean:
	rm -rf bin .cache spool outbox

# bench-smtp: smtp-source (one connection per message) against relaycar and a
# private stock Postfix, both relaying to smtp-sink; prints medians of 3
# rounds with ratios. Needs root; installs postfix if missing. Knobs: see
# tools/postfix-reference.sh (ROUNDS, SMALL_COUNT, LARGE_COUNT, LAT_COUNT ...).
.PHONY: bench-smtp
bench-smtp: build
	RELAYCAR=$(abspath $(BIN)) bash ./tools/postfix-reference.sh
