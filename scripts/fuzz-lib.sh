# What scripts/fuzz-smoke.sh and scripts/fuzz-campaign.sh share: sourced
# with the current directory at fuzz/. Targets run on the stable toolchain
# without a sanitizer (`-s none`); each has its seeds, libFuzzer limits
# and, where one helps, a dictionary.

# Installs cargo-fuzz if it is missing.
fuzz_install() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (a few minutes, once; quiet until done)"
    cargo install cargo-fuzz --locked --quiet
  fi
}

# Every target of fuzz/Cargo.toml, in its order.
fuzz_targets() {
  cargo fuzz list
}

# The committed seed directories of target $1 (the layer seeds serve both
# the applier and the tar parser).
fuzz_seed_dirs() {
  case $1 in
    apply) echo seeds/apply seeds/tar ;;
    tar) echo seeds/tar seeds/apply ;;
    *) [[ -d seeds/$1 ]] && echo "seeds/$1" ;;
  esac
  return 0
}

# libFuzzer options for target $1: memory bound (an input that needs more
# is a finding: the parsers promise bounded memory), a hang bound, input
# size, dictionary.
fuzz_opts() {
  local rss=512 len=16384
  case $1 in
    apply) rss=4096 len=65536 ;;
    tar) rss=512 len=65536 ;;
    decode) rss=1024 len=65536 ;;
    image) len=16384 ;;
    reference) len=512 ;;
    hosts | auth) len=8192 ;;
  esac
  echo "-rss_limit_mb=$rss -max_len=$len -timeout=10"
  [[ -f dicts/$1.dict ]] && echo "-dict=dicts/$1.dict"
  return 0
}

# Replays every saved reproducer of target $1 (fuzz/regressions/$1/*),
# each run once as an input; fails if any still crashes.
fuzz_replay() {
  local t=$1 files
  shopt -s nullglob
  files=(regressions/"$t"/*)
  shopt -u nullglob
  ((${#files[@]})) || return 0
  echo "== $t: replaying ${#files[@]} regression input(s)"
  # shellcheck disable=SC2046
  cargo fuzz run -s none "$t" "${files[@]}" -- $(fuzz_opts "$t") 2>&1 | tail -n 5
  return "${PIPESTATUS[0]}"
}

# Copies the crash artifacts of target $1 that regressions/$1 lacks into
# it; prints how many were new.
fuzz_keep_artifacts() {
  local t=$1 n=0 f
  mkdir -p "regressions/$t"
  shopt -s nullglob
  for f in artifacts/"$t"/crash-* artifacts/"$t"/timeout-* artifacts/"$t"/oom-* artifacts/"$t"/leak-*; do
    if [[ ! -e regressions/$t/${f##*/} ]]; then
      cp "$f" "regressions/$t/"
      n=$((n + 1))
    fi
  done
  shopt -u nullglob
  rmdir "regressions/$t" 2>/dev/null || true
  echo "$n"
}

# A libFuzzer final statistic ($2, e.g. number_of_executed_units) from
# the log $1.
fuzz_stat() {
  sed -n "s/^stat::$2: *//p" "$1" | tail -n 1
}

# Merges corpus/$1 down to a small set with the same edge coverage: a set
# cover over edges only (-use_counters=0: hit counts would keep ten times
# as many inputs), so the committed corpora stay small.
fuzz_minimize() {
  local t=$1 tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2046
  cargo fuzz run -s none "$t" "$tmp" "corpus/$t" -- $(fuzz_opts "$t") \
    -set_cover_merge=1 -use_counters=0 >"artifacts/logs/$t.merge.log" 2>&1 || {
    rm -rf "$tmp"
    tail -n 20 "artifacts/logs/$t.merge.log"
    return 1
  }
  rm -rf "corpus/$t"
  mv "$tmp" "corpus/$t"
  chmod 755 "corpus/$t"
}
