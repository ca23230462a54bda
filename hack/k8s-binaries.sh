#!/usr/bin/env bash
# Builds the real Kubernetes binaries the end-to-end tests run against, from Go
# modules at pinned versions (no prebuilt downloads): kube-apiserver,
# kube-controller-manager, kubectl, and for the one-node cluster kube-scheduler, kubelet and
# kube-proxy (k8s.io/kubernetes), etcd (go.etcd.io/etcd/server/v3) and helm (helm.sh/helm/v3).
#
# Usage:
#   hack/k8s-binaries.sh           build whatever is missing, then print one
#                                  NAME=/abs/path line per binary on stdout:
#                                    eval "$(hack/k8s-binaries.sh)"
#                                  sets KUBE_APISERVER, KUBE_CONTROLLER_MANAGER,
#                                  KUBECTL, KUBE_SCHEDULER, KUBELET, KUBE_PROXY,
#                                  ETCD and HELM,
#                                  and PROMETHEUS_OPERATOR_CRDS,
#                                  CERT_MANAGER_CRDS and CROSSPLANE_AWS_CRDS
#                                  (see below).
#   hack/k8s-binaries.sh --print   only print the paths; exit 1 if one is missing.
#   hack/k8s-binaries.sh --regen   rewrite hack/k8s-binaries/*/go.mod and go.sum
#                                  from the versions below (after bumping one).
#
# The chart test also validates the chart's PrometheusRule and ServiceMonitor
# against their CRDs: the Prometheus Operator's Go module ships them (in
# example/prometheus-operator-crd); it is downloaded into the Go module cache,
# checked against the pinned hash, and its CRD folder printed. Likewise its
# cert-manager objects (Issuer, Certificate) against cert-manager's CRDs, from
# deploy/crds of its Go module: plain YAML whose spec is the one its Helm chart
# installs (the chart's copies only add Helm-templated labels and annotations).
# The end-to-end tests guard cloud resources: Crossplane's AWS provider module
# (github.com/upbound/provider-aws) ships its managed resources' CRDs in
# package/crds, exactly what the provider package installs. (The AWS Controllers
# for Kubernetes and Config Connector modules are not served by the Go module
# proxy this project builds from, so those two are not pinned here.)
#
# Binaries are cached outside the work tree, as
#   ${AGENTGUARD_BIN_CACHE:-$HOME/.cache/agentguard/bin}/<name>-<version>
# and a cached binary is reused as is. Progress and timings go to stderr.
#
# Each binary is built inside a small wrapper module under hack/k8s-binaries/
# whose committed go.mod/go.sum pin the whole dependency graph. k8s.io/kubernetes
# cannot be `go install`ed (its go.mod replaces the k8s.io/* staging modules with
# ./staging paths), so its wrapper replaces each of them by the published
# v0.<minor>.<patch> module instead; etcd's server module has ../ replaces too.
set -euo pipefail

KUBERNETES_VERSION=v1.35.8 # newest v1.35 patch the Go module proxy serves
ETCD_VERSION=v3.6.16       # newest v3.6 patch the proxy serves (kubeadm 1.35 defaults to 3.6.6)
HELM_VERSION=v3.22.0       # newest v3 release the proxy serves
PROMETHEUS_OPERATOR_MODULE=github.com/prometheus-operator/prometheus-operator
PROMETHEUS_OPERATOR_VERSION=v0.89.0
PROMETHEUS_OPERATOR_SUM="h1:2HA351OwWBa10H6TDhjeSdHOA7wiY71sEivg+z2cykk="
CERT_MANAGER_MODULE=github.com/cert-manager/cert-manager
CERT_MANAGER_VERSION=v1.21.2 # newest release the proxy serves
CERT_MANAGER_SUM="h1:UWgoYM+KLNtRlqmoWOKjKBOBUPVHeepQ6/ac3ERJW68="
CROSSPLANE_AWS_MODULE=github.com/upbound/provider-aws
CROSSPLANE_AWS_VERSION=v1.23.0 # newest v1 release the proxy serves (its /v2 module is not served)
CROSSPLANE_AWS_SUM="h1:ZtukIrSGYVIwh23+Bif7HEe2ZMQor37BWwN/nh49WiU="

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODS="$HERE/k8s-binaries"
CACHE="${AGENTGUARD_BIN_CACHE:-$HOME/.cache/agentguard/bin}"

log() { printf '[k8s-binaries] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# name|output variable|version|wrapper module|package
BINARIES=(
  "kube-apiserver|KUBE_APISERVER|$KUBERNETES_VERSION|kubernetes|k8s.io/kubernetes/cmd/kube-apiserver"
  "kube-controller-manager|KUBE_CONTROLLER_MANAGER|$KUBERNETES_VERSION|kubernetes|k8s.io/kubernetes/cmd/kube-controller-manager"
  "kubectl|KUBECTL|$KUBERNETES_VERSION|kubernetes|k8s.io/kubernetes/cmd/kubectl"
  "kube-scheduler|KUBE_SCHEDULER|$KUBERNETES_VERSION|kubernetes|k8s.io/kubernetes/cmd/kube-scheduler"
  "kubelet|KUBELET|$KUBERNETES_VERSION|kubernetes|k8s.io/kubernetes/cmd/kubelet"
  "kube-proxy|KUBE_PROXY|$KUBERNETES_VERSION|kubernetes|k8s.io/kubernetes/cmd/kube-proxy"
  "etcd|ETCD|$ETCD_VERSION|etcd|go.etcd.io/etcd/server/v3"
  "helm|HELM|$HELM_VERSION|helm|helm.sh/helm/v3/cmd/helm"
)

# Version of module $2 required by the go.mod in directory $1 (offline).
required_version() {
  awk -v m="$2" '$1 == "require" { $1 = ""; $0 = $0 } $1 == m && $2 ~ /^v/ { print $2; exit }' "$1/go.mod"
}

ldflags_for() { # wrapper module, version
  local flags="-s -w" minor pkg
  case "$1" in
    kubernetes)
      # What hack/lib/version.sh sets: /version of the API server and kubectl's
      # client version report these (helm and kubectl check them).
      minor="${2#v1.}"
      minor="${minor%%.*}"
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$2 -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        flags+=" -X $pkg.gitTreeState=clean"
      done ;;
    # etcd: the version is a constant in go.etcd.io/etcd/api/v3/version; its
    # GitSHA stays "Not provided" since the module proxy does not tell commits.
    helm)
      # As helm's Makefile: its version, and the Kubernetes version it assumes
      # without a cluster (client-go v0.X.Y => 1.X).
      local cg
      cg="$(required_version "$MODS/helm" k8s.io/client-go)"
      [[ -n $cg ]] || die "k8s.io/client-go missing from $MODS/helm/go.mod"
      minor="${cg#v0.}"
      minor="${minor%%.*}"
      flags+=" -X helm.sh/helm/v3/internal/version.version=$2"
      flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
      for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
      done ;;
  esac
  printf '%s' "$flags"
}

# --regen: write $MODS/<name>/go.mod for upstream module $2@$3 with tools $4...,
# copying the upstream go and godebug directives, then `go mod tidy` it.
regen_module() {
  local name="$1" mod="$2" ver="$3"
  shift 3
  local dir="$MODS/$name" upstream gover m tool
  upstream="$(GOWORK=off go mod download -json "$mod@$ver" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -f $upstream ]] || die "could not download $mod@$ver"
  gover="$(awk '$1 == "go" { print $2; exit }' "$upstream")"
  mkdir -p "$dir"
  rm -f "$dir/go.sum"
  {
    printf '// Generated by hack/k8s-binaries.sh --regen; do not edit by hand.\n\n'
    printf 'module agentguard/hack/k8s-binaries/%s\n\ngo %s\n\n' "$name" "$gover"
    printf 'require %s %s\n\ntool (\n' "$mod" "$ver"
    for tool in "$@"; do printf '\t%s\n' "$tool"; done
    printf ')\n'
    # Upstream's godebug lines, so that the binary keeps its GODEBUG defaults
    # (those follow the main module's go.mod).
    awk '$1 == "godebug" { g = 1 } g { print } g && ($1 == ")" || $2 != "(") { g = 0 }' "$upstream" |
      sed '1s/^/\n/'
    if [[ $mod == k8s.io/kubernetes ]]; then
      # Each staging module kubernetes requires as v0.0.0 => its v0.X.Y release.
      printf '\n// k8s.io/kubernetes replaces these with ./staging/src/...: use the releases.\nreplace (\n'
      for m in $(awk '$2 == "v0.0.0" && $1 ~ /^k8s\.io\// { print $1 }' "$upstream"); do
        printf '\t%s => %s v0.%s\n' "$m" "$m" "${ver#v1.}"
      done
      printf ')\n'
    fi
  } >"$dir/go.mod"
  (cd "$dir" && GOWORK=off go mod tidy)
  log "wrote $dir/go.mod and go.sum"
}

regen() {
  command -v go >/dev/null || die "go is not installed"
  regen_module kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy
  regen_module etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3
  regen_module helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
}

check_pins() {
  local have
  for entry in "kubernetes k8s.io/kubernetes $KUBERNETES_VERSION" \
               "etcd go.etcd.io/etcd/server/v3 $ETCD_VERSION" \
               "helm helm.sh/helm/v3 $HELM_VERSION"; do
    set -- $entry
    [[ -f $MODS/$1/go.mod && -f $MODS/$1/go.sum ]] || die "$MODS/$1/go.mod or go.sum missing; run $0 --regen"
    have="$(required_version "$MODS/$1" "$2")"
    [[ $have == "$3" ]] || die "$MODS/$1/go.mod pins $2 ${have:-nothing}, this script $3; run $0 --regen"
  done
}

build() { # name version wrapper package output
  local name="$1" version="$2" dir="$MODS/$3" pkg="$4" out="$5" tmp start
  tmp="$out.tmp.$$"
  start=$SECONDS
  log "building $name $version ($pkg) ..."
  # A failed or interrupted build leaves no partial binary behind.
  trap "rm -f $(printf '%q' "$tmp")" EXIT
  (
    cd "$dir"
    GOWORK=off CGO_ENABLED=0 go build -mod=readonly -trimpath -buildvcs=false \
      -ldflags "$(ldflags_for "$3" "$version")" -o "$tmp" "$pkg"
  )
  mv -f "$tmp" "$out"
  trap - EXIT
  log "built $name $version in $((SECONDS - start))s -> $out"
}

# Prints <var>=<folder of module@version>/<subdir>; in build mode downloads the
# module first and refuses one whose hash is not the pinned one. Returns 1 when
# <file> is missing from that folder.
module_crds() { # mode var module version sum subdir file
  local mode="$1" var="$2" module="$3" version="$4" pinned="$5" subdir="$6" file="$7" json sum dir
  if [[ $mode == build ]]; then
    json="$(cd "$HERE" && GOWORK=off GOFLAGS=-mod=mod go mod download -json "$module@$version")" ||
      die "could not download $module@$version"
    sum="$(sed -n 's/^[[:space:]]*"Sum": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
    [[ $sum == "$pinned" ]] || die "$module@$version has hash ${sum:-none}, pinned $pinned"
    dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
  else
    local cache
    cache="$(go env GOMODCACHE 2>/dev/null || true)"
    dir="${cache:-${GOPATH:-$HOME/go}/pkg/mod}/$module@$version"
  fi
  dir="$dir/$subdir"
  printf '%s=%s\n' "$var" "$dir"
  if [[ ! -f $dir/$file ]]; then
    log "missing: $dir/$file (run ${BASH_SOURCE[0]} to download it)"
    return 1
  fi
}

crds() { # mode
  local status=0
  module_crds "$1" PROMETHEUS_OPERATOR_CRDS "$PROMETHEUS_OPERATOR_MODULE" "$PROMETHEUS_OPERATOR_VERSION" \
    "$PROMETHEUS_OPERATOR_SUM" example/prometheus-operator-crd monitoring.coreos.com_prometheusrules.yaml ||
    status=1
  module_crds "$1" CERT_MANAGER_CRDS "$CERT_MANAGER_MODULE" "$CERT_MANAGER_VERSION" \
    "$CERT_MANAGER_SUM" deploy/crds cert-manager.io_certificates.yaml || status=1
  module_crds "$1" CROSSPLANE_AWS_CRDS "$CROSSPLANE_AWS_MODULE" "$CROSSPLANE_AWS_VERSION" \
    "$CROSSPLANE_AWS_SUM" package/crds s3.aws.upbound.io_buckets.yaml || status=1
  return "$status"
}

main() {
  local mode=build
  case "${1:-}" in
    "") ;;
    --print) mode=print ;;
    --regen) regen; return ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; return ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac

  local entry name var version dir pkg out missing=0 built=0
  if [[ $mode == build ]]; then
    command -v go >/dev/null || die "go is not installed (the binaries are built from Go modules)"
    check_pins
    mkdir -p "$CACHE"
    # Serialise concurrent callers so that they do not build the same binary twice.
    if command -v flock >/dev/null; then
      exec 9>"$CACHE/.lock"
      flock 9
    fi
  fi
  CACHE="$(cd "$CACHE" 2>/dev/null && pwd || printf '%s' "$CACHE")"

  for entry in "${BINARIES[@]}"; do
    IFS='|' read -r name var version dir pkg <<<"$entry"
    out="$CACHE/$name-$version"
    if [[ ! -x $out ]]; then
      if [[ $mode == print ]]; then
        log "missing: $out (run ${BASH_SOURCE[0]} to build it)"
        missing=1
      else
        build "$name" "$version" "$dir" "$pkg" "$out"
        built=$((built + 1))
      fi
    fi
    printf '%s=%s\n' "$var" "$out"
  done
  crds "$mode" || missing=1
  if [[ $mode == build ]]; then
    log "$built built, $((${#BINARIES[@]} - built)) cached; ${SECONDS}s in all (cache: $CACHE)"
  fi
  return "$missing"
}

main "$@"
