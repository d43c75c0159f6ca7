#!/usr/bin/env bash
# README.md's opening commands, run as README.md writes them, so they
# cannot break silently (scripts/test.sh calls this; run as root):
#  1. the first line of the first ```sh block (a trailing `# comment`
#     stripped) runs with bash in the repository root; it must succeed and
#     its last stdout line must be a chain ID, `sha256:<64 hex>`;
#  2. the second line of that block must be the command .ci/run runs
#     (`exec <it>`);
#  3. the second ```sh block (mount the unpacked image, chroot into it)
#     runs twice in a row: it must succeed both times (it is meant to be
#     rerunnable) and print the demo's "Hello, world!".
# Nothing is adjusted for CI: /tmp/unlade-demo and /tmp/rootfs are the
# README's own paths, left from an earlier run or not.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
  echo "README.md's commands run as root: run this as root" >&2
  exit 1
fi

# Prints the lines of the $1-th ```sh block of README.md (1-based).
sh_block() {
  awk -v n="$1" '
    /^```/ {
      if (open) { open = 0; if (sh && k == n) exit; sh = 0 }
      else { open = 1; if ($0 == "```sh") { sh = 1; k++ } }
      next
    }
    open && sh && k == n
  ' README.md
}

# Line $1 of the first ```sh block, without a trailing `# comment`.
first_block_command() {
  sh_block 1 | sed -n "$1p" | sed -E 's/[[:space:]]+#.*$//; s/[[:space:]]+$//'
}

fail() {
  echo "README.md: $*" >&2
  exit 1
}

out=$(mktemp)
cleanup() {
  rm -f "$out"
  # A failed mount snippet may leave its mount behind.
  if mountpoint -q /tmp/rootfs 2>/dev/null; then umount /tmp/rootfs || true; fi
}
trap cleanup EXIT

# 1. The first command.
cmd=$(first_block_command 1)
[[ -n $cmd ]] || fail "no first command (first line of the first \`\`\`sh block)"
echo "== README first command: $cmd"
if ! bash -c "$cmd" | tee "$out"; then
  fail "the first command failed: $cmd"
fi
last=$(tail -n 1 "$out")
[[ $last =~ ^sha256:[0-9a-f]{64}$ ]] ||
  fail "the first command's last stdout line is not a chain ID: '$last'"
echo "README first command: ok, top chain ID $last"

# 2. The second command is what CI runs.
cmd2=$(first_block_command 2)
grep -qxF "exec $cmd2" .ci/run ||
  fail "the second command '$cmd2' is not what .ci/run runs ($(grep -E '^exec ' .ci/run || echo 'no exec line'))"
echo "README second command: '$cmd2', as .ci/run runs it"

# 3. The mount snippet, twice.
snippet=$(sh_block 2)
[[ $snippet == *" mounts "* && $snippet == *chroot* ]] ||
  fail "the second \`\`\`sh block is not the mount snippet (no 'mounts' and 'chroot')"
for run in 1 2; do
  echo "== README mount snippet, run $run of 2"
  if ! bash -c "$snippet" | tee "$out"; then
    fail "the mount snippet failed (run $run of 2)"
  fi
  grep -qx "Hello, world!" "$out" ||
    fail "the mount snippet did not print 'Hello, world!' (run $run of 2)"
  if mountpoint -q /tmp/rootfs; then
    fail "the mount snippet left /tmp/rootfs mounted (run $run of 2)"
  fi
done
echo "README mount snippet: ok, twice"
