# gpusched — `make help` lists the targets.

SHELL := /bin/bash
export CGO_CFLAGS := -Wno-deprecated-declarations
GO      ?= go
BUF     := $(GO) tool -modfile=tools/go.mod buf
BIN     := bin/gpusched
PKGS    := ./...
# go test flags; e.g. make test TESTFLAGS='-run TestPlace -v'
TESTFLAGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build bin/gpusched
	$(GO) build -o $(BIN) ./cmd/gpusched

.PHONY: run
run: build ## Run a dev cluster: embedded etcd + scheduler + 4 simulated DGX H100 nodes
	$(BIN) dev $(RUNFLAGS)

# -count=1: the end-to-end tests exercise a binary they build themselves,
# which go test's result cache cannot see, so results are never cached.
.PHONY: test
test: proto-check lint ## Run the whole suite: proto and lint checks, unit, integration and end-to-end tests
	$(GO) test -race -count=1 -timeout 30m $(TESTFLAGS) $(PKGS)

.PHONY: test-short
test-short: ## Unit tests only (skips the end-to-end tests)
	$(GO) test -short $(TESTFLAGS) $(PKGS)

.PHONY: proto
proto: ## Lint the protos and regenerate the committed code: Go, gRPC, REST gateway, OpenAPI document
	$(BUF) lint
	$(BUF) generate

.PHONY: proto-check
proto-check: ## Fail if the protos break lint, break compatibility with main, or the generated code is stale
	$(BUF) lint
	@scripts/proto-check.sh

.PHONY: lint
lint: ## gofmt and go vet
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet $(PKGS)

.PHONY: clean
clean: ## Remove build outputs
	rm -rf bin
