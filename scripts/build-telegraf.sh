#!/usr/bin/env bash
# build-telegraf.sh builds the custom Telegraf v1.37.2 used by the demo and the
# end-to-end tests: a stock Telegraf with only the plugins they need, compiled
# from the Go module cache (or the module proxy) with Telegraf's own build tags.
#
#   scripts/build-telegraf.sh          # prints the path of the binary on stdout
#
# The binary lands in ${BUILD_DIR:-$HOME/.cache/telegraf-omnicore}/telegraf-1.37.2/
# and never in the repository. The script is idempotent: it does nothing when
# the binary exists, reports version 1.37.2 and was built with the same tag
# list (kept in a stamp file next to it); it rebuilds when the tags change. Two
# runs at once are serialised with flock, so parallel test packages and the
# demo can all call it.
set -euo pipefail

VERSION=1.37.2
# The plugins compiled in (the names are those of Telegraf's
# plugins/<kind>/all/<name>.go build constraints). The end-to-end tests and the
# demo call this script, so a change here rebuilds for them too.
TAGS="custom"
TAGS+=",inputs.execd,inputs.mock,inputs.internal,inputs.file,inputs.cpu,inputs.mem"
TAGS+=",outputs.execd,outputs.file,outputs.mqtt,outputs.discard"
TAGS+=",processors.printer"
TAGS+=",parsers.influx,parsers.json,serializers.influx,serializers.json"

if [[ -z "${BUILD_DIR:-}" ]]; then
	if [[ -z "${HOME:-}" ]]; then
		echo "build-telegraf: set BUILD_DIR (or HOME) to where the Telegraf build is cached" >&2
		exit 1
	fi
	BUILD_DIR="$HOME/.cache/telegraf-omnicore"
fi
DEST="$BUILD_DIR/telegraf-$VERSION"
BIN="$DEST/telegraf"
STAMP="$DEST/build-tags"
GO="${GO:-go}"

log() { printf 'build-telegraf: %s\n' "$*" >&2; }

current() {
	[[ -x "$BIN" && -f "$STAMP" ]] || return 1
	[[ "$(cat "$STAMP")" == "$TAGS" ]] || return 1
	"$BIN" --version 2>/dev/null | grep -q "^Telegraf $VERSION\b"
}

mkdir -p "$DEST"
# Serialise concurrent builds; the lock is held until the script exits.
exec 9>"$DEST/.lock"
if ! flock -n 9; then
	log "another build is running; waiting for it"
	flock 9
fi

if current; then
	echo "$BIN"
	exit 0
fi

log "building Telegraf $VERSION with tags $TAGS into $DEST (a few minutes the first time)"
start=$(date +%s)
tmp="$(mktemp -d "$DEST/.gobin.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# go install pkg@version ignores any go.mod in the working directory; run it
# from the build directory so that nothing is ever written into a repository.
(
	cd "$DEST"
	GOBIN="$tmp" "$GO" install \
		-tags "$TAGS" \
		-ldflags "-X github.com/influxdata/telegraf/internal.Version=$VERSION" \
		"github.com/influxdata/telegraf/cmd/telegraf@v$VERSION"
)
mv -f "$tmp/telegraf" "$BIN"
printf '%s' "$TAGS" >"$STAMP"
if ! current; then
	log "the built binary does not report Telegraf $VERSION: $("$BIN" --version 2>&1 || true)"
	exit 1
fi
log "built in $(($(date +%s) - start))s: $("$BIN" --version)"
echo "$BIN"
