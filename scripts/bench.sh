#!/usr/bin/env bash
# bench.sh runs every benchmark of telegraf-omnicore on loopback and prints
# the table (benchmark, ours, peer, ratio, note); the full run also writes it
# with the method to docs/benchmarks.md. It is what `make bench` runs.
#
#   scripts/bench.sh                 # full run, 3 runs per figure (~15 min)
#   scripts/bench.sh -quick          # smoke run with small sizes (< 1 min)
#   scripts/bench.sh -runs 5 -only 1,1b
#
# Flags are passed to cmd/omnicore-bench (run it with -h for all of them).
#
# Peers it needs, none installed by hand:
#   - mosquitto (Debian) for the neutral-broker rows: installed with apt-get
#     when missing and running as root; otherwise those rows are skipped
#     with a note. Set BENCH_NO_INSTALL=1 to never install.
#   - Telegraf 1.37.2 for benchmarks 2, 7 and 9: built by
#     scripts/build-telegraf.sh (from the Go module cache) unless -telegraf
#     is given, and with our plugins compiled in for benchmark 9's built-in
#     route (scripts/build-telegraf.sh --builtin) unless -telegraf-builtin
#     is given.
#   - mosquitto_sub (Debian's mosquitto-clients) as benchmark 9's subscriber;
#     without it a subscriber in the benchmark's process counts instead.
set -euo pipefail

cd "$(dirname "$0")/.."
GO="${GO:-go}"

log() { printf 'bench: %s\n' "$*" >&2; }

quick=0
for a in "$@"; do
	[[ "$a" == "-quick" || "$a" == "--quick" ]] && quick=1
done

if ! command -v mosquitto >/dev/null 2>&1 && [[ ! -x /usr/sbin/mosquitto ]]; then
	if [[ "${BENCH_NO_INSTALL:-}" == "" && "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
		log "installing mosquitto from Debian for the neutral-broker rows"
		if ! { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; }; then
			log "could not install mosquitto: the mosquitto rows will be skipped"
		fi
	else
		log "mosquitto is not installed (apt-get install -y mosquitto as root): the mosquitto rows will be skipped"
	fi
fi

bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
"$GO" build -o "$bin/omnicore-bench" ./cmd/omnicore-bench
"$GO" build -o "$bin/telegraf-omnicore" ./cmd/telegraf-omnicore

args=(-omnicore-bin "$bin/telegraf-omnicore")
if [[ " $* " != *" -telegraf "* ]]; then
	if tg="$(timeout 900 scripts/build-telegraf.sh)"; then
		args+=(-telegraf "$tg")
	else
		log "could not build Telegraf: benchmark 2 will be skipped"
		args+=(-telegraf none)
	fi
fi
if [[ " $* " != *" -telegraf-builtin "* ]]; then
	if tg="$(timeout 900 scripts/build-telegraf.sh --builtin)"; then
		args+=(-telegraf-builtin "$tg")
	else
		log "could not build the built-in Telegraf: benchmark 9's built-in route will be skipped"
		args+=(-telegraf-builtin none)
	fi
fi
if [[ $quick == 0 && " $* " != *" -out "* ]]; then
	args+=(-out docs/benchmarks.md)
fi
exec "$bin/omnicore-bench" "${args[@]}" "$@"
