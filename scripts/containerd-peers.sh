#!/usr/bin/env bash
# Debian's containerd of newer suites beside the system's (bookworm's 1.6):
# by default trixie's (1.7) and sid's (2.x), each unpacked into its own
# prefix, $UNLADE_PEERS/SUITE (default /opt/unlade-peers/SUITE), so that
# PREFIX/usr/bin holds its containerd, ctr and containerd-shim-runc-v2.
#
#   scripts/containerd-peers.sh [-f|--force] [SUITE...]     (as root)
#
# Only the package `containerd` is fetched, without its dependencies: the
# peers run containers with the system's runc (/usr/sbin/runc). The system's
# apt state is left alone (nothing in /etc/apt, /var/lib/apt, /var/lib/dpkg
# changes): apt runs on a private directory, $UNLADE_PEERS_STATE (default
# /var/tmp/unlade-peers/apt), whose sources list names only the suites still
# to install, with the archive URI and keyring of the system's own sources
# (/etc/apt/sources.list.d/*.sources, else the one-line sources.list;
# $UNLADE_PEERS_URI and $UNLADE_PEERS_KEYRING override them). A prefix holds
# a stamp, PREFIX/.unlade-peer, with the installed version: a suite already
# installed needs no network (--force fetches it again, whatever the
# suite's version now). No version is pinned: each run says what it has.
#
# For each suite it prints the version, the path of its containerd and the
# --version of containerd, ctr and the shim; a binary that does not run
# (with the libraries ldd misses) is an error. Exit status 1 with one line
# on stderr on any failure; apt's own output is in STATE/apt.log.
set -euo pipefail

me=containerd-peers
die() {
  echo "$me: $*" >&2
  exit 1
}

force=0
suites=()
while (($#)); do
  case $1 in
    -f | --force) force=1 ;;
    -h | --help)
      sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*) die "unknown option $1 (usage: $0 [-f|--force] [SUITE...])" ;;
    *)
      [[ $1 =~ ^[a-z][a-z0-9-]*$ ]] || die "not a suite name: $1"
      suites+=("$1")
      ;;
  esac
  shift
done
((${#suites[@]})) || suites=(trixie sid)

base=${UNLADE_PEERS:-/opt/unlade-peers}
state=${UNLADE_PEERS_STATE:-/var/tmp/unlade-peers/apt}
bins=(containerd ctr containerd-shim-runc-v2)

# A suite is installed when its stamp and every binary are there.
installed() {
  local p=$base/$1 b
  [[ -s $p/.unlade-peer ]] || return 1
  for b in "${bins[@]}"; do [[ -x $p/usr/bin/$b ]] || return 1; done
}

# The archive URI and keyring of the system's first plain-suite deb source
# (not -updates / -security), as "URI KEYRING" (KEYRING may be empty).
system_source() {
  local f
  shopt -s nullglob
  for f in /etc/apt/sources.list.d/*.sources; do
    awk '
      function stanza() {
        if (enabled && types ~ /(^|[ \t])deb([ \t]|$)/ && uri != "")
          for (i = split(suites, s, /[ \t]+/); i > 0; i--)
            if (s[i] != "" && s[i] !~ /-/) { print uri, key; done = 1; exit }
        types = uri = suites = key = ""; enabled = 1
      }
      BEGIN { enabled = 1 }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { stanza(); next }
      /^[ \t]/ { next }
      {
        field = tolower($1); sub(/:.*/, "", field)
        value = $0; sub(/^[^:]*:[ \t]*/, "", value); sub(/[ \t]+$/, "", value)
        if (field == "types") types = value
        else if (field == "uris") { split(value, u, /[ \t]+/); uri = u[1] }
        else if (field == "suites") suites = value
        else if (field == "enabled") enabled = (tolower(value) != "no")
        else if (field == "signed-by" && value ~ /^\//) key = value
      }
      END { if (!done) stanza() }
    ' "$f" | grep -m1 . && return 0
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r $f ]] || continue
    awk '
      $1 != "deb" { next }
      {
        key = ""; i = 2
        if ($2 ~ /^\[/) {
          for (; i <= NF; i++) {
            o = $i; gsub(/[][]/, "", o)
            if (o ~ /^signed-by=/) { key = o; sub(/^signed-by=/, "", key) }
            if ($i ~ /\]$/) { i++; break }
          }
        }
        if (i + 1 <= NF && $(i + 1) !~ /-/) { print $i, key; exit }
      }
    ' "$f" | grep -m1 . && return 0
  done
  return 1
}

todo=()
for s in "${suites[@]}"; do
  if ((force)) || ! installed "$s"; then todo+=("$s"); fi
done

if ((${#todo[@]})); then
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/debs" ||
    die "cannot create $state (run as root, or set UNLADE_PEERS_STATE)"
  exec 9>"$state/lock"
  flock 9
  src=$(system_source) || src=
  uri=${UNLADE_PEERS_URI:-${src%% *}}
  keyring=${UNLADE_PEERS_KEYRING:-${src#* }}
  [[ -n $uri ]] || die "no deb source in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list; set UNLADE_PEERS_URI"
  [[ -z $keyring || -r $keyring ]] || die "keyring $keyring (of the system's sources) is not readable"
  opts=""
  [[ -n $keyring ]] && opts="[signed-by=$keyring] "
  for s in "${todo[@]}"; do echo "deb ${opts}${uri} $s main"; done >"$state/sources.list"
  : >"$state/status"
  apt=(
    -o "Dir::Etc::SourceList=$state/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "Dir::State=$state"
    -o "Dir::State::Lists=$state/lists"
    -o "Dir::State::status=$state/status"
    -o "Dir::Cache=$state/cache"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "Acquire::Languages=none"
    -o "Acquire::PDiffs=false"
    -o "APT::Sandbox::User=root"
  )
  for t in DEP-11 DEP-11-icons DEP-11-icons-small DEP-11-icons-hidpi Contents-deb; do
    apt+=(-o "Acquire::IndexTargets::deb::$t::DefaultEnabled=false")
  done
  log=$state/apt.log
  echo "$me: fetching the package lists of ${todo[*]} from $uri" >&2
  apt-get -q "${apt[@]}" update >"$log" 2>&1 ||
    die "apt-get update of ${todo[*]} failed: $(grep -m1 -E '^(E|W):' "$log" || tail -n1 "$log")"
  for s in "${todo[@]}"; do
    dl=$state/debs/$s
    rm -rf "$dl"
    mkdir -p "$dl"
    (cd "$dl" && apt-get -q "${apt[@]}" download "containerd/$s") >>"$log" 2>&1 ||
      die "$s: apt-get download containerd/$s failed: $(grep -m1 '^E:' "$log" || tail -n1 "$log")"
    debs=("$dl"/containerd_*.deb)
    [[ -s ${debs[0]} ]] || die "$s: apt-get download left no containerd_*.deb in $dl"
    deb=${debs[0]}
    version=$(dpkg-deb -f "$deb" Version) || die "$s: $deb is not a .deb"
    prefix=$base/$s
    new=$prefix.new.$$
    rm -rf "$new"
    mkdir -p "$new" || die "cannot create $new (run as root, or set UNLADE_PEERS)"
    dpkg-deb -x "$deb" "$new" || die "$s: dpkg-deb -x $deb failed"
    echo "containerd $version" >"$new/.unlade-peer"
    rm -rf "$prefix"
    mv "$new" "$prefix"
    rm -rf "$dl"
    echo "$me: $s: installed containerd $version in $prefix" >&2
  done
fi

# Each binary must run: its version line, or why not.
for s in "${suites[@]}"; do
  prefix=$base/$s
  installed "$s" || die "$s: $prefix is incomplete after install"
  read -r _ version <"$prefix/.unlade-peer"
  echo "$s: containerd $version in $prefix"
  for b in "${bins[@]}"; do
    f=$prefix/usr/bin/$b
    flag=--version
    [[ $b == containerd-shim-* ]] && flag=-v
    rc=0
    out=$(timeout 10 "$f" "$flag" </dev/null 2>&1) || rc=$?
    if ((rc)); then
      missing=$(ldd "$f" 2>&1 | grep -E 'not found' | sed 's/^[[:space:]]*//' | paste -sd ';' - || true)
      die "$s: $f $flag failed (exit $rc)${missing:+: missing libraries: $missing}: $(grep -m1 . <<<"$out" || echo no output)"
    fi
    line=$(grep . <<<"$out" | head -n2 | tr -s ' \t\n' ' ' | sed 's/ $//')
    if [[ $b == containerd ]]; then
      echo "$s: $f: $line"
    else
      echo "$s:   $b: $line"
    fi
  done
done
