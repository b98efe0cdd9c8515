#!/usr/bin/env bash
# build-telegraf.sh builds Telegraf v1.37.2 with Telegraf's own build tags,
# for the demo, the end-to-end tests and users:
#
#   scripts/build-telegraf.sh            # stock Telegraf (runs our plugins through execd)
#   scripts/build-telegraf.sh --builtin  # Telegraf with outputs.omnicore and inputs.omnicore compiled in
#
# Both print the path of the binary as the last line of stdout.
#
# The stock binary is `go install`ed from the Go module cache (or the module
# proxy). The built-in one is built the way Telegraf documents for adding a
# plugin to a custom build: in a copy of Telegraf's source tree, with one file
# per plugin in plugins/{outputs,inputs}/all/ behind the build tags
# outputs.omnicore and inputs.omnicore, and this repository added to
# Telegraf's go.mod through a replace directive. The build fails when adding
# this module would change any requirement of Telegraf's go.mod (the module is
# importable at no cost; internal/gomodcheck checks the same from our side).
#
# TELEGRAF_EXTRA_TAGS adds build tags to both builds, comma-separated, in
# Telegraf's naming (plugins/<kind>/all/<name>.go), e.g.
#   TELEGRAF_EXTRA_TAGS=inputs.modbus,outputs.influxdb_v2 make telegraf-builtin
#
# Binaries land in ${BUILD_DIR:-$HOME/.cache/telegraf-omnicore}/telegraf-1.37.2/
# and .../telegraf-builtin-1.37.2/, never in the repository. The script does
# nothing when the binary exists, reports version 1.37.2 and was built from the
# same inputs (tags, and for the built-in one a hash of this module's sources,
# kept in a stamp file next to it). Two runs at once are serialised with flock,
# so parallel test packages and the demo can all call it.
set -euo pipefail

VERSION=1.37.2
MODE=stock
case "${1:-}" in
"") ;;
--builtin) MODE=builtin ;;
*)
	echo "usage: $0 [--builtin]" >&2
	exit 2
	;;
esac

# The plugins compiled in (the names are those of Telegraf's
# plugins/<kind>/all/<name>.go build constraints). The end-to-end tests and the
# demo call this script, so a change here rebuilds for them too.
TAGS="custom"
TAGS+=",inputs.execd,inputs.mock,inputs.internal,inputs.file,inputs.cpu,inputs.mem"
TAGS+=",outputs.execd,outputs.file,outputs.mqtt,outputs.discard"
TAGS+=",processors.printer"
TAGS+=",parsers.influx,parsers.json,serializers.influx,serializers.json"
if [[ "$MODE" == builtin ]]; then
	TAGS+=",outputs.omnicore,inputs.omnicore"
	# The data formats the plugins support (the same set as the execd
	# binary's, cmd/telegraf-omnicore/formats.go).
	TAGS+=",parsers.csv,parsers.json_v2,parsers.value,parsers.xpath,parsers.binary"
	TAGS+=",serializers.carbon2,serializers.csv,serializers.graphite,serializers.nowmetric"
	TAGS+=",serializers.splunkmetric,serializers.wavefront,serializers.msgpack,serializers.template,serializers.binary"
	TAGS+=",secretstores.docker"
fi
if [[ -n "${TELEGRAF_EXTRA_TAGS:-}" ]]; then
	TAGS+=",${TELEGRAF_EXTRA_TAGS// /}"
fi

if [[ -z "${BUILD_DIR:-}" ]]; then
	if [[ -z "${HOME:-}" ]]; then
		echo "build-telegraf: set BUILD_DIR (or HOME) to where the Telegraf build is cached" >&2
		exit 1
	fi
	BUILD_DIR="$HOME/.cache/telegraf-omnicore"
fi
GO="${GO:-go}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
MODULE="github.com/telegraf-omnicore/telegraf-omnicore"
if [[ "$MODE" == builtin ]]; then
	DEST="$BUILD_DIR/telegraf-builtin-$VERSION"
else
	DEST="$BUILD_DIR/telegraf-$VERSION"
fi
BIN="$DEST/telegraf"
STAMP="$DEST/build-tags"

log() { printf 'build-telegraf: %s\n' "$*" >&2; }

# inputs is what the binary is built from: the tags, and for the built-in
# binary the sources of this module it compiles in.
inputs() {
	printf '%s' "$TAGS"
	if [[ "$MODE" == builtin ]]; then
		printf '\n'
		(cd "$REPO" && find go.mod go.sum plugins -type f \( -name '*.go' -o -name '*.conf' -o -name go.mod -o -name go.sum \) \
			! -name '*_test.go' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
	fi
}

# requirements prints the "path version" requirements of the go.mod in the
# current directory, sorted.
requirements() {
	"$GO" mod edit -print | awk '
		/^require \(/ { inblock = 1; next }
		inblock && /^\)/ { inblock = 0; next }
		inblock { print $1, $2; next }
		/^require / { print $2, $3 }' | sort
}

current() {
	[[ -x "$BIN" && -f "$STAMP" ]] || return 1
	[[ "$(cat "$STAMP")" == "$(inputs)" ]] || return 1
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

log "building $MODE Telegraf $VERSION with tags $TAGS into $DEST (a few minutes the first time)"
start=$(date +%s)
tmp="$(mktemp -d "$DEST/.gobin.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
LDFLAGS="-X github.com/influxdata/telegraf/internal.Version=$VERSION"

if [[ "$MODE" == stock ]]; then
	# go install pkg@version ignores any go.mod in the working directory; run
	# it from the build directory so that nothing is ever written into a
	# repository.
	(
		cd "$DEST"
		GOBIN="$tmp" "$GO" install -tags "$TAGS" -ldflags "$LDFLAGS" \
			"github.com/influxdata/telegraf/cmd/telegraf@v$VERSION"
	)
	mv -f "$tmp/telegraf" "$BIN"
else
	SRC="$DEST/src"
	if [[ ! -f "$SRC/.complete" ]]; then
		MODDIR="$(cd "$DEST" && "$GO" mod download -json "github.com/influxdata/telegraf@v$VERSION" |
			sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
		[[ -n "$MODDIR" && -d "$MODDIR" ]] || {
			log "cannot find Telegraf $VERSION in the module cache"
			exit 1
		}
		rm -rf "$SRC"
		cp -r "$MODDIR" "$SRC"
		chmod -R u+w "$SRC"
		cp "$SRC/go.mod" "$SRC/go.mod.orig"
		cp "$SRC/go.sum" "$SRC/go.sum.orig"
		touch "$SRC/.complete"
	fi
	# Start from Telegraf's own go.mod every time, then add this module.
	cp "$SRC/go.mod.orig" "$SRC/go.mod"
	cp "$SRC/go.sum.orig" "$SRC/go.sum"
	for kind in outputs inputs; do
		cat >"$SRC/plugins/$kind/all/omnicore.go" <<EOF
//go:build !custom || $kind || $kind.omnicore

package all

import _ "$MODULE/plugins/$kind/omnicore" // register plugin
EOF
	done
	(
		cd "$SRC"
		"$GO" mod edit -require="$MODULE@v0.0.0-00010101000000-000000000000" -replace="$MODULE=$REPO"
		requirements >"$tmp/before"
		GOFLAGS=-mod=mod "$GO" build -tags "$TAGS" -ldflags "$LDFLAGS" -o "$tmp/telegraf" ./cmd/telegraf
		requirements >"$tmp/after"
	)
	# Every requirement Telegraf's go.mod had must be unchanged: go build
	# -mod=mod only records what is missing, and raises a version when a
	# module we require is newer than Telegraf's.
	changed="$(comm -23 "$tmp/before" "$tmp/after")"
	if [[ -n "$changed" ]]; then
		log "compiling this module into Telegraf $VERSION changed these requirements of Telegraf's go.mod (now: $(comm -13 "$tmp/before" "$tmp/after" | tr '\n' ' ')):"
		printf '%s\n' "$changed" >&2
		exit 1
	fi
	mv -f "$tmp/telegraf" "$BIN"
fi
inputs >"$STAMP"
if ! current; then
	log "the built binary does not report Telegraf $VERSION: $("$BIN" --version 2>&1 || true)"
	exit 1
fi
log "built in $(($(date +%s) - start))s: $("$BIN" --version)"
echo "$BIN"
