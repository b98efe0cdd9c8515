#!/usr/bin/env bash
# stress-test.sh runs the test suite several times while a busy loop keeps
# every core busy, to shake out the tests that only pass on an idle machine
# (CI runs while other work loads the cores). It is what `make stress-test`
# runs; it prints, per package, how many runs passed and failed, and the
# tests that failed.
#
#   scripts/stress-test.sh                        # the whole suite, 5 runs
#   STRESS_RUNS=2 STRESS_PKGS=./emulator/... scripts/stress-test.sh
#
# STRESS_RUNS   runs (default 5)
# STRESS_PKGS   packages (default ./...)
# STRESS_LOAD   busy loops (default: one per core)
# STRESS_LIMIT  the busy loops end by themselves after this, even if this
#               script is killed (default 4h; a `timeout` duration)
# STRESS_FLAGS  extra `go test` flags, e.g. -short or -run TestX
#
# The logs of every run stay in a temporary directory named at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
GO="${GO:-go}"
runs="${STRESS_RUNS:-5}"
pkgs="${STRESS_PKGS:-./...}"
load="${STRESS_LOAD:-$(nproc)}"
limit="${STRESS_LIMIT:-4h}"
read -r -a flags <<<"${STRESS_FLAGS:-}"

logdir="$(mktemp -d "${TMPDIR:-/tmp}/omnicore-stress.XXXXXX")"
pids=()
stop_load() {
	for p in "${pids[@]}"; do
		kill "$p" 2>/dev/null || true
	done
	wait "${pids[@]}" 2>/dev/null || true
	pids=()
}
trap stop_load EXIT
trap 'exit 130' INT TERM

# Build the tests (and the binaries the end-to-end tests build) before the
# load starts, so that compiling is not what the load slows down.
if ! "$GO" test "${flags[@]}" -count=1 -run '^$' $pkgs >/dev/null; then
	echo "stress-test: the tests do not build" >&2
	exit 1
fi

for _ in $(seq "$load"); do
	timeout "$limit" sh -c 'while :; do :; done' &
	pids+=("$!")
done
echo "stress-test: $load busy loops on $(nproc) cores; $runs runs of go test $pkgs; logs in $logdir" >&2

for run in $(seq "$runs"); do
	start=$(date +%s)
	status=0
	"$GO" test -count=1 -timeout 30m "${flags[@]}" $pkgs >"$logdir/run-$run.log" 2>&1 || status=$?
	echo "stress-test: run $run/$runs finished in $(($(date +%s) - start))s, exit status $status" >&2
done
stop_load

# Per package: runs passed and failed. Per failed test: how often. (POSIX
# awk: the sorting is left to sort.)
tally() {
	awk -v want="$1" '
		/^ok[ \t]/ { pass[$2]++; seen[$2] = 1; next }
		/^FAIL[ \t]+[^ \t]+[ \t]/ { fail[$2]++; seen[$2] = 1
			for (t in pending) tests[$2 " " t]++
			split("", pending); next }
		/^[ \t]*--- FAIL: / { pending[$3] = 1; next }
		END {
			if (want == "packages") for (p in seen) printf "%-72s %6d %6d\n", p, pass[p], fail[p]
			else for (t in tests) printf "  %s: %d\n", t, tests[t]
		}
	' "$logdir"/run-*.log | sort
}
printf '%-72s %6s %6s\n' package passed failed
tally packages
failed="$(tally tests)"
if [[ -n "$failed" ]]; then
	printf '\nfailed tests (package test: failed runs):\n%s\n' "$failed"
	echo "stress-test: FAIL (logs in $logdir)" >&2
	exit 1
fi
echo "stress-test: every run passed (logs in $logdir)" >&2
