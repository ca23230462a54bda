#!/usr/bin/env bash
# The soak run: agentguard on a real control plane under mixed traffic (held, approved, denied
# and Warn-mode requests, audit records, churn charges, agent labels and policies coming and
# going, humans' writes, the serving certificate replaced every few minutes), failing on any
# unexpected answer or when its memory, open files or threads grow past the bounds in
# tests/soak.rs. Figures of runs: docs/testing.md#soak.
#
#   hack/soak.sh                 # one hour
#   hack/soak.sh --duration 600  # ten minutes
#   hack/soak.sh --smoke         # five minutes, a rotation every minute (CI)
#   hack/soak.sh --flood 60 [--rate 1000[,200,50]] [--replicas 3] [--release]
#                                # agents' changes flooded straight at agentguard, one step per
#                                # rate; --release runs the release build (what the image ships)
set -euo pipefail
cd "$(dirname "$0")/.."

duration=3600
rotate=180
flood=""
rate=1000
replicas=1
release=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) duration=300; rotate=60 ;;
    --duration) duration="$2"; shift ;;
    --rotate) rotate="$2"; shift ;;
    --flood) flood="$2"; shift ;;
    --rate) rate="$2"; shift ;;
    --replicas) replicas="$2"; shift ;;
    --release) release=1 ;;
    *) echo "usage: hack/soak.sh [--smoke] [--duration SECONDS] [--rotate SECONDS] | --flood SECONDS [--rate N[,N…]] [--replicas N] [--release]" >&2; exit 2 ;;
  esac
  shift
done

eval "$(hack/k8s-binaries.sh)"
export KUBE_APISERVER KUBE_CONTROLLER_MANAGER ETCD KUBECTL
if [ -n "$release" ]; then
  # agentguard as shipped; the harness around it (processes, the load client) stays a test build.
  cargo build --locked --quiet --release --bin agentguard
  export AGENTGUARD_BIN="$PWD/target/release/agentguard"
fi
if [ -n "$flood" ]; then
  cargo test --locked --test soak -- --flood "$flood" --rate "$rate" --replicas "$replicas"
else
  cargo test --locked --test soak -- --duration "$duration" --rotate "$rotate"
fi
