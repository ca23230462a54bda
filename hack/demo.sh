#!/usr/bin/env bash
# The quick start: builds what it needs (agentguard, and kube-apiserver, kube-controller-manager,
# etcd and kubectl from pinned Go modules on first use), starts a throwaway control plane on
# 127.0.0.1 with agentguard registered, and walks an agent's delete through deny → approve →
# allow with real kubectl.
# It then keeps running, printing the kubeconfigs and the agent's token, until Ctrl-C.
# Pass --exit to stop right after the walk-through.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(hack/k8s-binaries.sh)"
export KUBE_APISERVER KUBE_CONTROLLER_MANAGER ETCD KUBECTL HELM
exec cargo test --locked --quiet --test demo -- "$@"
