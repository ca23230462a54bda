#!/usr/bin/env bash
# Builds agentguard's container image from the repository's Dockerfile without pulling a base
# image: the binary is built here (statically linked glibc, cargo profile `image`), then podman
# builds only the Dockerfile's final stage (FROM scratch) from a context holding that binary, and
# saves it as an archive for `ctr images import`. It also builds the node's pod sandbox ("pause")
# image the same way, from a few lines of C linked statically, since registry.k8s.io cannot be
# reached either.
#
# Usage:
#   hack/image.sh [--tag TAG]   build, then print NAME=value lines:
#                                 eval "$(hack/image.sh)"
#                               sets AGENTGUARD_IMAGE (localhost/agentguard:TAG),
#                               AGENTGUARD_IMAGE_ARCHIVE, PAUSE_IMAGE, PAUSE_IMAGE_ARCHIVE.
#
# Podman runs with a configuration of the project's own (cgroupfs, no default ulimits, its
# storage under ${AGENTGUARD_IMAGE_CACHE:-$HOME/.cache/agentguard/image}), where the archives are
# written too. Installs podman first if missing (hack/node.sh). Progress and timings go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=dev
PAUSE_TAG=3.10
TARGET=x86_64-unknown-linux-gnu
PROFILE=image
CACHE="${AGENTGUARD_IMAGE_CACHE:-$HOME/.cache/agentguard/image}"

log() { printf '[image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while (($#)); do
  case "$1" in
    --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

eval "$(hack/node.sh)"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

# Podman's own configuration: the machine's defaults (systemd cgroups, ulimits a container may
# not raise) do not hold in every container this runs in.
cat >"$SCRATCH/containers.conf" <<EOF
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$SCRATCH/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$SCRATCH/run"
EOF
export CONTAINERS_CONF="$SCRATCH/containers.conf" CONTAINERS_STORAGE_CONF="$SCRATCH/storage.conf"

start=$SECONDS
log "cargo build --profile $PROFILE --target $TARGET (static) ..."
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --quiet --profile "$PROFILE" \
  --target "$TARGET" --bin agentguard
binary="target/$TARGET/$PROFILE/agentguard"
if command -v file >/dev/null && ! file -b "$binary" | grep -Eq 'static(ally|-pie) linked'; then
  die "$binary is not statically linked: $(file -b "$binary")"
fi
log "binary built in $((SECONDS - start))s ($(du -h "$binary" | cut -f1))"

build_image() { # name dockerfile context...
  local name="$1" dockerfile="$2" context="$3" archive="$CACHE/${1//[\/:]/_}.tar"
  "$PODMAN" build --quiet --pull=never --build-arg BINARY_FROM=context -f "$dockerfile" \
    -t "$name" "$context" >/dev/null
  rm -f "$archive"
  "$PODMAN" save --quiet --format docker-archive -o "$archive" "$name"
  log "$name: $("$PODMAN" image inspect --format '{{.Size}}' "$name") bytes, saved to $archive"
  printf '%s' "$archive"
}

start=$SECONDS
mkdir "$SCRATCH/agentguard"
# Symbols are of no use in the image (backtraces keep function names only with them; the
# logs carry what an operator needs): stripped, the image is about a fifth smaller.
if command -v strip >/dev/null; then
  strip -o "$SCRATCH/agentguard/agentguard" "$binary"
else
  cp "$binary" "$SCRATCH/agentguard/agentguard"
fi
image="localhost/agentguard:$TAG"
archive="$(build_image "$image" Dockerfile "$SCRATCH/agentguard")"

# The sandbox image: sleeps until told to stop, reaping orphans (what Kubernetes' pause does).
mkdir "$SCRATCH/pause"
cat >"$SCRATCH/pause/pause.c" <<'EOF'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction s = {0}, r = {0};
  s.sa_handler = stop;
  r.sa_handler = reap;
  r.sa_flags = SA_NOCLDSTOP;
  if (sigaction(SIGINT, &s, NULL) || sigaction(SIGTERM, &s, NULL) || sigaction(SIGCHLD, &r, NULL))
    return 1;
  for (;;) pause();
}
EOF
cc -static -Os -s -o "$SCRATCH/pause/pause" "$SCRATCH/pause/pause.c"
cat >"$SCRATCH/pause/Dockerfile" <<'EOF'
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
EOF
pause="localhost/agentguard-pause:$PAUSE_TAG"
pause_archive="$(build_image "$pause" "$SCRATCH/pause/Dockerfile" "$SCRATCH/pause")"
log "images built and saved in $((SECONDS - start))s"

printf 'AGENTGUARD_IMAGE=%s\nAGENTGUARD_IMAGE_ARCHIVE=%s\nPAUSE_IMAGE=%s\nPAUSE_IMAGE_ARCHIVE=%s\n' \
  "$image" "$archive" "$pause" "$pause_archive"
