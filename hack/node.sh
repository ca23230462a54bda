#!/usr/bin/env bash
# What the one-node cluster of tests/cluster.rs needs besides the Kubernetes binaries of
# hack/k8s-binaries.sh (kubelet, kube-proxy): containerd, runc and the CNI plugins (bridge,
# host-local, loopback), iptables, and podman to build images. All from Debian's packages,
# installed with apt-get when missing (as root).
#
# Usage:
#   hack/node.sh           install what is missing, then print one NAME=/abs/path line each:
#                            eval "$(hack/node.sh)"
#                          sets CONTAINERD, CTR, RUNC, CNI_BIN_DIR, IPTABLES and PODMAN.
#   hack/node.sh --print   only print them; exit 1 if one is missing.
#
# Nothing is configured or started here: the suite writes containerd's, the CNI's, the
# kubelet's and kube-proxy's configuration under its own scratch folder and removes it, with the
# bridge, the iptables chains and the mounts it made, when it stops. Progress goes to stderr.
set -euo pipefail

log() { printf '[node] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# variable|Debian package|path
TOOLS=(
  "CONTAINERD|containerd|/usr/bin/containerd"
  "CTR|containerd|/usr/bin/ctr"
  "RUNC|runc|/usr/sbin/runc"
  "CNI_BIN_DIR|containernetworking-plugins|/usr/lib/cni"
  "IPTABLES|iptables|/usr/sbin/iptables"
  "PODMAN|podman|/usr/bin/podman"
)
# The CNI plugins the suite's network configuration uses.
CNI_PLUGINS=(bridge host-local loopback)

present() { # path
  if [[ $1 == */cni ]]; then
    local plugin
    for plugin in "${CNI_PLUGINS[@]}"; do [[ -x $1/$plugin ]] || return 1; done
    return 0
  fi
  [[ -x $1 ]]
}

main() {
  local mode=install
  case "${1:-}" in
    "") ;;
    --print) mode=print ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; return ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac

  local entry var pkg path missing=() status=0
  for entry in "${TOOLS[@]}"; do
    IFS='|' read -r var pkg path <<<"$entry"
    present "$path" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    # Unique, in order.
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++')
    if [[ $mode == print ]]; then
      log "missing packages: ${missing[*]} (run ${BASH_SOURCE[0]} to install them)"
      status=1
    else
      [[ $(id -u) == 0 ]] || die "installing ${missing[*]} needs root"
      command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
      local start=$SECONDS
      log "installing ${missing[*]} ..."
      # Lists older than a day may name versions the archive no longer serves.
      if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1) ]]; then
        apt-get update -qq >&2
      fi
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "${missing[@]}" >&2
      log "installed in $((SECONDS - start))s"
    fi
  fi
  for entry in "${TOOLS[@]}"; do
    IFS='|' read -r var pkg path <<<"$entry"
    present "$path" || { [[ $mode == print ]] || die "$path missing after installing $pkg"; }
    printf '%s=%s\n' "$var" "$path"
  done
  return "$status"
}

main "$@"
