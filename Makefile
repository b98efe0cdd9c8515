# telegraf-omnicore: build, test, demo and benchmark targets.
# BUILD_DIR is shared by tests, the demo and benchmarks (a custom Telegraf is
# cached there); it is never inside the repository.
BUILD_DIR ?= $(HOME)/.cache/telegraf-omnicore
export BUILD_DIR
GO ?= go

.PHONY: all build test test-short stress-test vet demo telegraf telegraf-builtin bench fuzz soak emulator clean-build dist

all: build

build:
	$(GO) build ./...

vet:
	$(GO) vet ./...

## test runs every test: unit, emulator integration and end to end against a real Telegraf.
test:
	$(GO) vet ./...
	$(GO) -C tools/dist vet ./...
	$(GO) test -count=1 -timeout 20m ./...
	$(GO) -C tools/dist test -count=1 -timeout 10m ./...

## test-short skips the end-to-end and long tests.
test-short:
	$(GO) test -short -count=1 -timeout 10m ./...

## stress-test runs the whole suite STRESS_RUNS times (default 5) while a busy loop keeps every
## core busy, and prints passed/failed runs per package (about 15-30 minutes on 2 cores).
## STRESS_PKGS narrows it (e.g. ./emulator/...), STRESS_FLAGS adds go test flags.
stress-test:
	./scripts/stress-test.sh

## telegraf builds (or finds cached in BUILD_DIR) the custom Telegraf v1.37.2 the demo and end-to-end tests run.
telegraf:
	./scripts/build-telegraf.sh

## telegraf-builtin builds (or finds cached in BUILD_DIR) Telegraf v1.37.2 with outputs.omnicore and
## inputs.omnicore compiled in, plus the plugins of the custom build above, and prints its path last.
## TELEGRAF_EXTRA_TAGS adds Telegraf build tags to both builds, e.g.
## TELEGRAF_EXTRA_TAGS=inputs.modbus,outputs.influxdb_v2 make telegraf-builtin
telegraf-builtin:
	@./scripts/build-telegraf.sh --builtin

## demo runs a real Telegraf with both plugins against the bridge emulator for DEMO_DURATION (default 25s).
demo:
	./scripts/demo.sh

## bench runs every benchmark on loopback against its peers (about 15 minutes on 2 cores), prints
## the table and writes docs/benchmarks.md. BENCH_FLAGS go to the harness, e.g. BENCH_FLAGS=-quick.
bench:
	./scripts/bench.sh $(BENCH_FLAGS)

## fuzz runs every fuzz target for FUZZTIME each; their seeds also run in every "go test".
FUZZTIME ?= 10s
FUZZ_TARGETS = \
	./plugins/common/omnicore:FuzzTopic \
	./plugins/common/omnicore:FuzzParseTopic \
	./cmd/telegraf-omnicore:FuzzOutputStdin \
	./execd/spool:FuzzSegmentReader \
	./plugins/inputs/omnicore:FuzzInboundPayload \
	./emulator:FuzzRegistryFile \
	./emulator:FuzzAdminAPI \
	./emulator:FuzzParseAttachPayload \
	./emulator:FuzzTopicChecks

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; \
		echo "fuzz: $$fn ($$pkg) for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s $$pkg; \
	done

## soak runs the long variants of the fault suite (about 8 minutes).
soak:
	$(GO) test -count=1 -timeout 60m -run TestFaults -v ./hardening -soak

## emulator runs the OmniCore bridge emulator with the example registry.
emulator:
	$(GO) run ./cmd/omnicore-emulator -registry testdata/registry.json

## dist builds the release into dist/ (git-ignored): static binaries (CGO_ENABLED=0) of
## telegraf-omnicore and omnicore-emulator, and per platform a tarball, a .deb and an .rpm,
## plus SHA256SUMS. The version is git describe's. The packager (nfpm) is its own module,
## tools/dist, so that its requirements stay out of the product's go.mod.
DIST_PLATFORMS ?= linux/amd64,linux/arm64,linux/arm/v7
dist:
	rm -rf dist
	$(GO) -C tools/dist run . -repo $(CURDIR) -out $(CURDIR)/dist -platforms $(DIST_PLATFORMS)

clean-build:
	rm -rf $(BUILD_DIR)
