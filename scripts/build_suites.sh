#!/usr/bin/env bash
# Build what the kernel-suite tests need, once, into a cache; print the built directory.
#   build_suites.sh kernel            Debian's linux-source-6.1, x86_64_defconfig + kvm_guest.config
#                                     + scripts/kernel/nestedkvm.config (bzImage and modules, in tree)
#   build_suites.sh kselftests        tools/testing/selftests/kvm of that same tree
#   build_suites.sh kut TARBALL       kvm-unit-tests from a source tarball (configured and built)
#   build_suites.sh xtf TARBALL       the Xen Test Framework from a source tarball (built in place)
#   build_suites.sh qemu-backports    bookworm-backports' QEMU (a newer TCG than bookworm's 7.2),
#                                     fetched and unpacked, never installed; prints its binary
# A build is keyed by its inputs (source version, config fragment, tarball), so a changed fragment
# builds anew and an unchanged one costs nothing. Builds happen in DIR.partial and are renamed to
# DIR when they succeed: an interrupted build never looks finished.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${NESTEDKVM_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pytest-nestedkvm/builds}
jobs=$(nproc)
log() { echo "build_suites: $*" >&2; }

# Installs what a build needs when it is missing and this is Debian; else says what to install.
need_packages() {
  local missing=() package sudo=""
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return
  command -v apt-get >/dev/null || { log "missing ${missing[*]}: install them (or their equivalents)"; exit 2; }
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  apt-cache show "${missing[@]}" >/dev/null 2>&1 || $sudo apt-get update -qq
  if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
    log "missing ${missing[*]}, which this system's package sources do not offer: install them"
    exit 2
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

source_tarball() {
  need_packages linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev kmod
  echo /usr/src/linux-source-6.1.tar.xz
}

kernel_dir() {
  local version key
  version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
  key=$(cat "$here/kernel/nestedkvm.config" | sha256sum | cut -c1-12)
  echo "$cache/linux-$version-$key"
}

build_kernel() {
  local dir tarball start
  tarball=$(source_tarball)  # first: the build's key holds the installed source's version
  dir=$(kernel_dir)
  if [ -f "$dir/arch/x86/boot/bzImage" ]; then echo "$dir"; return; fi
  start=$SECONDS
  rm -rf "$dir.partial" && mkdir -p "$dir.partial"
  log "unpacking $tarball"
  tar -xf "$tarball" -C "$dir.partial" --strip-components=1
  (
    cd "$dir.partial"
    make -s x86_64_defconfig >&2
    scripts/kconfig/merge_config.sh -m .config kernel/configs/kvm_guest.config "$here/kernel/nestedkvm.config" >/dev/null
    make -s olddefconfig >&2
    log "building the kernel with $jobs jobs"
    make -s -j"$jobs" bzImage modules >&2
  )
  mv "$dir.partial" "$dir"
  log "kernel $(make -s -C "$dir" kernelrelease) built in $((SECONDS - start)) s"
  echo "$dir"
}

build_kselftests() {
  local dir start
  dir=$(build_kernel)
  if [ -f "$dir/.kselftests-built" ]; then echo "$dir/tools/testing/selftests/kvm"; return; fi
  start=$SECONDS
  make -s -C "$dir" headers >&2
  # -k: a test that does not build in this backport (dirty_log_test, steal_time in 6.1.192) is
  # missing from the list; the rest still builds and runs.
  make -s -k -C "$dir/tools/testing/selftests/kvm" -j"$jobs" >&2 ||
    log "some KVM selftests did not build (see above); the others are there"
  touch "$dir/.kselftests-built"
  log "KVM selftests built in $((SECONDS - start)) s"
  echo "$dir/tools/testing/selftests/kvm"
}

build_kut() {
  local tarball=${1:?usage: build_suites.sh kut TARBALL} dir start
  [ -f "$tarball" ] || { log "no such tarball: $tarball"; exit 2; }
  dir="$cache/kvm-unit-tests-$(sha256sum "$tarball" | cut -c1-12)"
  # configure wrote the build path into config.mak (ERRATATXT, which the runner reads): point it at
  # the final directory, also in a tree built before this line existed.
  fix_paths() { sed -i "s|$dir\.partial|$dir|g" "$dir/config.mak"; }
  if [ -f "$dir/x86/msr.flat" ]; then fix_paths; echo "$dir"; return; fi
  need_packages build-essential
  start=$SECONDS
  rm -rf "$dir.partial" && mkdir -p "$dir.partial"
  tar -xf "$tarball" -C "$dir.partial" --strip-components=1
  (cd "$dir.partial" && ./configure >&2 && make -s -j"$jobs" >&2)
  mv "$dir.partial" "$dir"
  fix_paths
  log "kvm-unit-tests built in $((SECONDS - start)) s"
  echo "$dir"
}

build_xtf() {
  local tarball=${1:?usage: build_suites.sh xtf TARBALL} dir start
  [ -f "$tarball" ] || { log "no such tarball: $tarball"; exit 2; }
  dir="$cache/xtf-$(sha256sum "$tarball" | cut -c1-12)"
  if [ -f "$dir/tests/example/test-pv64-example" ]; then echo "$dir"; return; fi
  need_packages build-essential python3
  start=$SECONDS
  rm -rf "$dir.partial" && mkdir -p "$dir.partial"
  tar -xf "$tarball" -C "$dir.partial" --strip-components=1
  # xtfdir: the tests' xl configs name their binaries by absolute path, the final one.
  make -s -C "$dir.partial" -j"$jobs" xtfdir="$dir" >&2
  mv "$dir.partial" "$dir"
  log "XTF built in $((SECONDS - start)) s"
  echo "$dir"
}

fetch_qemu_backports() {
  # apt with a sources list and package lists of its own, in the cache: the system's apt sources,
  # lists and installed packages stay as they are.
  local apt="$cache/.apt-backports" version dir start
  local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=-
              -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
  command -v apt-get >/dev/null || { log "qemu-backports needs Debian's apt-get"; exit 2; }
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  echo "deb http://deb.debian.org/debian bookworm-backports main" > "$apt/sources.list"
  if ! apt-get "${opts[@]}" update -qq >&2; then
    dir=$(ls -d "$cache"/qemu-backports-*/ 2>/dev/null | sort -V | tail -1)  # offline: the one fetched before
    [ -n "$dir" ] && { echo "${dir%/}/usr/bin/qemu-system-x86_64"; return; }
    log "cannot fetch bookworm-backports' package lists: reach deb.debian.org, or use your own QEMU"; exit 2
  fi
  version=$(apt-cache "${opts[@]}" show qemu-system-x86 | sed -n 's/^Version: //p' | sort -V | tail -1)
  [ -n "$version" ] || { log "bookworm-backports offers no qemu-system-x86"; exit 2; }
  dir="$cache/qemu-backports-${version//[:+~]/_}"
  if [ -x "$dir/usr/bin/qemu-system-x86_64" ]; then echo "$dir/usr/bin/qemu-system-x86_64"; return; fi
  start=$SECONDS
  rm -rf "$dir.partial" && mkdir -p "$dir.partial/debs"
  (cd "$dir.partial/debs" && apt-get "${opts[@]}" download -qq "qemu-system-x86=$version" "qemu-system-data=$version" >&2)
  for deb in "$dir.partial"/debs/*.deb; do dpkg-deb -x "$deb" "$dir.partial"; done
  # Its libraries are bookworm's: a missing one shows here, not in the first guest's boot.
  "$dir.partial/usr/bin/qemu-system-x86_64" --version >&2 ||
    { log "QEMU $version from bookworm-backports does not run on this system"; exit 2; }
  rm -rf "$dir.partial/debs"
  mv "$dir.partial" "$dir"
  log "QEMU $version from bookworm-backports unpacked in $((SECONDS - start)) s"
  echo "$dir/usr/bin/qemu-system-x86_64"
}

# One build at a time per cache: a second caller waits, then finds the result built.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

case "${1:-}" in
  kernel) build_kernel ;;
  kselftests) build_kselftests ;;
  kut) build_kut "${2:-}" ;;
  xtf) build_xtf "${2:-}" ;;
  qemu-backports) fetch_qemu_backports ;;
  *) echo "usage: $0 kernel | kselftests | kut TARBALL | xtf TARBALL | qemu-backports" >&2; exit 2 ;;
esac
