#!/bin/sh
# Builds and runs containerd 1.6's snapshotter conformance suite against
# `unlade snapshotter` (see unlade_test.go).
#
#   tests/conformance/run.sh OUTDIR [UNLADE_BIN] [-- extra test flags]
#
# Needs root (the suite mounts overlays and binds) and Debian bookworm's
# golang-go and golang-github-containerd-containerd-dev (containerd 1.6.20's
# sources under /usr/share/gocode/src), built in GOPATH mode: no modules, no
# network. Prints each case's PASS/FAIL; the full log is OUTDIR/test.log.
# Exits 1 when a case fails, 2 when something stays mounted afterwards.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: run.sh OUTDIR [UNLADE_BIN] [-- test flags]}
shift
bin=$repo/target/debug/unlade
if [ $# -gt 0 ] && [ "$1" != -- ]; then bin=$1; shift; fi
[ $# -gt 0 ] && [ "$1" = -- ] && shift
[ "$(id -u)" = 0 ] || { echo "run.sh: needs root" >&2; exit 2; }
[ -x "$bin" ] || { echo "run.sh: no unlade binary at $bin" >&2; exit 2; }
[ -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite ] || {
	echo "run.sh: apt-get install golang-github-containerd-containerd-dev" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

start=$(date +%s)
(cd "$here" && GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= \
	GOCACHE=${GOCACHE:-$out/gocache} go test -c -o "$out/conformance.test" .)
echo "built $out/conformance.test in $(( $(date +%s) - start ))s"

rc=0
UNLADE_BIN=$bin "$out/conformance.test" -test.root -test.v -test.timeout 20m "$@" \
	>"$out/test.log" 2>&1 || rc=$?

# Each case's verdict (the suite's cases are subtests of TestUnlade).
grep -E '^ *--- (PASS|FAIL|SKIP): TestUnlade/' "$out/test.log" |
	sed -E 's/^ *--- (PASS|FAIL|SKIP): TestUnlade\/([^ ]*) (.*)/\1 \2 \3/' | sort -k2
echo "passed $(grep -cE '^ *--- PASS: TestUnlade/' "$out/test.log" || true)," \
	"failed $(grep -cE '^ *--- FAIL: TestUnlade/' "$out/test.log" || true); log: $out/test.log"

# The suite's temporary directories are snapshot-suite-unlade-*.
left=$(awk '$5 ~ /snapshot-suite-unlade-/ {print $5}' /proc/self/mountinfo)
if [ -n "$left" ]; then
	echo "still mounted:"; echo "$left"; exit 2
fi
exit $rc
