#!/usr/bin/env bash
# The benchmark through the real API server (docs/load-benchmark.md, "Through the API server"):
# a control plane (etcd, kube-apiserver, kube-controller-manager from hack/k8s-binaries.sh), a
# release agentguard registered as its webhook, and wrk sending `DELETE ...?dryRun=All` of a
# ConfigMap with ServiceAccount tokens: no admission, agentguard refusing it, an equivalent
# ValidatingAdmissionPolicy refusing it, round after round. Prints req/s, p50, p99 of each, what
# the API server measured of the webhook call, and the ratios.
#
#   hack/bench-apiserver.sh           release agentguard, 3 rounds of 10 s per mode, 16 connections
#   hack/bench-apiserver.sh --smoke   dev build, one round of 2 s: proves the benchmark works
#
# Environment: APIBENCH_DURATION (seconds, default 10), APIBENCH_ROUNDS (3),
# APIBENCH_CONNECTIONS (16), APIBENCH_HTTP2 (1: offer HTTP/2, which the API server uses only to a
# loopback webhook; default HTTP/1.1, as through a Service), APIBENCH_AGENTGUARD_ARGS (more
# `agentguard serve` flags).
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
case "${1:-}" in
  --smoke) smoke=true ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

# The load generator and the check of single answers: Debian packages of the same names.
missing=()
for tool in wrk curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  echo "installing ${missing[*]} (Debian packages)" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

eval "$(hack/k8s-binaries.sh)"
export KUBE_APISERVER KUBE_CONTROLLER_MANAGER ETCD KUBECTL

if $smoke; then
  exec cargo test --locked --test apibench -- --smoke
fi
# agentguard in release; the harness around it (which only starts processes and reads wrk) in
# the dev profile the other test targets share.
cargo build --locked --quiet --release --bin agentguard
AGENTGUARD_BIN="$PWD/target/release/agentguard" exec cargo test --locked --test apibench
