# telegraf-omnicore: build, test, demo and benchmark targets.
# BUILD_DIR is shared by tests, the demo and benchmarks (a custom Telegraf is
# cached there); it is never inside the repository.
BUILD_DIR ?= $(HOME)/.cache/telegraf-omnicore
export BUILD_DIR
GO ?= go

.PHONY: all build test test-short vet demo bench emulator clean-build

all: build

build:
	$(GO) build ./...

vet:
	$(GO) vet ./...

## test runs every test: unit, emulator integration and end to end against a real Telegraf.
test:
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 20m ./...

## test-short skips the end-to-end and long tests.
test-short:
	$(GO) test -short -count=1 -timeout 10m ./...

## emulator runs the OmniCore bridge emulator with the example registry.
emulator:
	$(GO) run ./cmd/omnicore-emulator -registry testdata/registry.json

clean-build:
	rm -rf $(BUILD_DIR)
