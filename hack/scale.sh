#!/usr/bin/env bash
# The scale scenario (docs/performance.md): agentguard's resident memory with 10,000
# ServiceAccounts in 2,000 Namespaces and 1,000 policies, and the CPU it spends taking the
# policies in, on a real control plane. Takes a few minutes; not part of CI.
# With --agents N[,N…]: the cost of marking the Nth individually labelled agent with N − 1
# registered, and the webhook configuration's size (docs/topology.md#webhook-topology).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(hack/k8s-binaries.sh)"
export KUBE_APISERVER KUBE_CONTROLLER_MANAGER ETCD KUBECTL HELM
exec cargo test --locked --release --test scale -- "$@"
