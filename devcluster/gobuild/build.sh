#!/usr/bin/env bash
# Builds the local cluster's binaries from the Go module proxy, pinned, and prints the folder that holds
# them all as its last line. Usage: build.sh [--seed-from OLD_BIN_DIR] [COMPONENT...]
#
# Each component (components/<name>.sh: its version pin, its file list, its build function) is cached
# on its own under $AUTOGLM_BIN_CACHE (default <repo>/.cache/k8s-bin)/<name>/<key>, where <key> hashes
# the component's script, its input folder (<name>/, if any: k8s/main.go, coredns/main.go), common.sh
# and the Go version. Editing one component rebuilds that component only; editing this driver rebuilds
# nothing. The folder printed, bin/<set key>, hard-links every component's files together.
#
# --seed-from DIR takes components from an all-in-one bin folder of the former layout (one key for
# everything, with versions.txt) when its versions.txt has the component's exact version line, instead
# of building them (the recipes did not change with the move; a component whose pin changed is built).
# --keys prints each component's cache key and builds nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${AUTOGLM_BIN_CACHE:-$repo/.cache/k8s-bin}
all=(k8s etcd kwok helm prometheus keda gateway-api coredns hydra traefik)
seed=""
if [[ ${1:-} == --seed-from ]]; then seed=$(cd "$2" && pwd); shift 2; fi
wanted=("$@")
[[ ${#wanted[@]} -gt 0 && ${1:-} != --keys ]] || wanted=("${all[@]}")

start=$(date +%s)
log() { echo "[build $(( $(date +%s) - start ))s] $*" >&2; }
gover=$(go env GOVERSION)

# The cache key of a component: its script, its input folder, common.sh, the Go version.
key_of() {
  local c=$1
  { cat "$here/common.sh" "$here/components/$c.sh"; echo "$gover"
    if [[ -d $here/$c ]]; then find "$here/$c" -type f | LC_ALL=C sort | xargs cat; fi
  } | sha256sum | cut -c1-12
}
# A component's declared version line or file list (sourced in a subshell).
describe() { ( . "$here/components/$1.sh"; if [[ $2 == version ]]; then echo "$version"; else echo "${files[@]}"; fi ); }

ensure() {  # build (or seed) one component; prints its folder
  local c=$1 key dir tmp f
  key=$(key_of "$c"); dir="$cache/$c/$key"
  if [[ -f $dir/.complete ]]; then echo "$dir"; return; fi
  tmp="$cache/$c/.tmp-$key-$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  if [[ -n $seed ]] && grep -qxF "$(describe "$c" version)" "$seed/versions.txt" 2>/dev/null; then
    log "$c: seeded from $seed ($(describe "$c" version))"
    for f in $(describe "$c" files); do cp -a --link "$seed/$f" "$tmp/"; done
  else
    log "$c: building $(describe "$c" version)"
    local work; work=$(mktemp -d)
    ( . "$here/common.sh"; . "$here/components/$c.sh"; build "$tmp" "$work" "$here/$c" ) >&2 || {
      rm -rf "$work" "$tmp"; log "$c: build failed"; exit 1; }
    rm -rf "$work"
    for f in $(describe "$c" files); do [[ -e $tmp/$f ]] || { log "$c: build made no $f"; exit 1; }; done
  fi
  describe "$c" version > "$tmp/.version"
  touch "$tmp/.complete"
  rm -rf "$dir"; mv "$tmp" "$dir"
  # Older builds of this component (other pins or recipes) are not needed any more.
  find "$cache/$c" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
  echo "$dir"
}

if [[ ${1:-} == --keys ]]; then
  for c in "${all[@]}"; do echo "$c $(key_of "$c")"; done
  exit 0
fi

dirs=()
for c in "${wanted[@]}"; do
  [[ -f $here/components/$c.sh ]] || { echo "unknown component $c (one of: ${all[*]})" >&2; exit 2; }
  d=$(ensure "$c")
  dirs+=("$d")
done

# The set: every component's files in one folder (hard links), keyed by the component keys.
setkey=$(printf '%s\n' "${dirs[@]}" | sha256sum | cut -c1-12)
bin="$cache/bin/$setkey"
if [[ ! -f $bin/.complete ]]; then
  tmp="$cache/bin/.tmp-$setkey-$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  for d in "${dirs[@]}"; do
    for f in "$d"/* ; do cp -a --link "$f" "$tmp/"; done
    cat "$d/.version" >> "$tmp/versions.txt"
  done
  touch "$tmp/.complete"
  rm -rf "$bin"; mv "$tmp" "$bin"
  log "done: $bin"
fi
# Other sets may be another checkout's (worktrees share the cache, with other component lists) and in
# use by its running cluster: remove only those nobody asked for in a day (each use touches its set).
touch "$bin"
find "$cache/bin" -mindepth 1 -maxdepth 1 ! -name "$setkey" -mmin +1440 -exec rm -rf {} +
echo "$bin"
