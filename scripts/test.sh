#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with only the Rust
# toolchain: installs what the build links (libisal-dev, found with
# pkg-config) and the real tools the tests drive (GNU tar, bsdtar, Go,
# Python, pigz, zstd, docker-registry, skopeo, containerd, runc,
# python3-grpcio, containerd's Go sources for its conformance suite, and
# containerd 1.7 and 2.x from newer Debian suites; as root), then format, lint,
# README.md's opening commands (scripts/readme-commands.sh), every test, and
# a short fuzz run (installing cargo-fuzz first if missing: a few quiet
# minutes). CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
# The build itself: engine/build.rs links the system ISA-L (the streaming
# gzip decoder) and finds it with pkg-config.
command -v pkg-config >/dev/null || need_pkgs+=(pkg-config)
pkg-config --exists libisal 2>/dev/null || need_pkgs+=(libisal-dev)
command -v tar     >/dev/null || need_pkgs+=(tar)
command -v bsdtar  >/dev/null || need_pkgs+=(libarchive-tools)
command -v go      >/dev/null || need_pkgs+=(golang-go)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v pigz    >/dev/null || need_pkgs+=(pigz)
command -v zstd    >/dev/null || need_pkgs+=(zstd)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
# The pull tests: a real registry, skopeo to push, htpasswd for Basic
# auth, openssl for the Bearer token server's key and signatures.
command -v docker-registry >/dev/null || need_pkgs+=(docker-registry)
command -v skopeo  >/dev/null || need_pkgs+=(skopeo)
command -v htpasswd >/dev/null || need_pkgs+=(apache2-utils)
command -v openssl >/dev/null || need_pkgs+=(openssl)
# The snapshotter tests: the real containerd (1.6) and runc.
command -v containerd >/dev/null || need_pkgs+=(containerd)
command -v runc    >/dev/null || need_pkgs+=(runc)
# contrib/unlade-snapshotter.service, checked by systemd-analyze verify.
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
# The CRI pulls (perf/cri_pull.py): Debian's python3 with its grpcio.
/usr/bin/python3 -c 'import grpc' 2>/dev/null || need_pkgs+=(python3 python3-grpcio)
# containerd's own snapshotter conformance suite (tests/conformance): the
# sources of bookworm's containerd 1.6.20 and of what they import.
[[ -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite ]] ||
  need_pkgs+=(golang-github-containerd-containerd-dev)
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "missing ${need_pkgs[*]}: run as root (the tests need root anyway)" >&2
    exit 1
  fi
  echo "== apt-get install ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# The tests hold ISA-L to zlib-rs: a build that fell back to zlib-rs
# (engine/build.rs) would pass them without testing ISA-L at all.
export UNLADE_REQUIRE_ISAL=1
if [[ $(id -u) != 0 ]]; then
  echo "the tests chown, mknod and set trusted.* xattrs: run as root" >&2
  exit 1
fi
# containerd 1.7 (trixie's) and 2.x (sid's) beside the system's 1.6, from
# Debian's packages, in /opt/unlade-peers without touching apt's state: the
# snapshotter tests run against all three.
echo "== containerd 1.7 and 2.x (scripts/containerd-peers.sh)"
scripts/containerd-peers.sh

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The library's documentation, as docs.rs would build it: no broken link,
# no warning (a runtime embedding unlade reads these pages).
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc -p unlade --no-deps --locked -q
# The crate as it would be published: its manifest and file list, no warning
# (the build of the packaged crate is what the tests below do).
echo "== cargo package"
pkg_out=$(cargo package -p unlade --locked --no-verify --allow-dirty 2>&1) || { echo "$pkg_out"; exit 1; }
if grep -q '^warning' <<< "$pkg_out"; then echo "$pkg_out"; exit 1; fi
# README.md's first command and mount snippet, as written there. Before the
# tests: a broken first command fails in minutes, not after the whole suite;
# after clippy --locked, so Cargo.lock is known current before the README's
# plain `cargo run` builds.
scripts/readme-commands.sh
# The stage order of engine/src and no import cycles (also part of cargo
# test below; first, because it takes a second and says where a new
# module went wrong).
echo "== module layering (engine/tests/layering.rs)"
cargo test -p unlade --locked --test layering -q
echo "== cargo test (UNLADE_BACKEND=syscalls)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
UNLADE_BACKEND=syscalls cargo test --workspace --locked 2>&1 | tee "$log"
# Once more on the io_uring backend, every test that writes a tree through
# a backend (the binary and the tests' in-process roots take it from
# UNLADE_BACKEND): apply and unpack, hostile and corrupt input, writers,
# workers, snapshots, many layers, full disks and kills. Left to the first
# pass: the engine's unit tests (they name their backends themselves), the
# tests whose subject is not the writing (registry pulls, singleflight, gc,
# signals, power loss, content: their trees come from the apply code
# tested here) and backends.rs, which runs both backends itself and
# compares them tree for tree.
echo "== cargo test (UNLADE_BACKEND=uring)"
UNLADE_BACKEND=uring cargo test --locked -p unlade-tests \
  --test entries --test unpack --test unpack_errors --test hostile \
  --test hostile_images --test corrupt --test writers --test workers \
  --test snapshots --test many_layers 2>&1 | tee -a "$log"
echo "== fuzz smoke run"
# 10 s a target here (scripts/fuzz-campaign.sh runs the long ones): CI's
# 30 minutes also hold the containerd tests now.
FUZZ_SECONDS=${FUZZ_SECONDS:-10} scripts/fuzz-smoke.sh
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
