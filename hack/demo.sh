#!/usr/bin/env bash
# The quick start: builds what it needs (agentguard, and kube-apiserver, kube-controller-manager,
# etcd and kubectl from pinned Go modules on first use), starts a throwaway control plane on
# 127.0.0.1 with agentguard registered, and walks an agent's delete through deny → approve →
# allow with real kubectl.
# It then keeps running, printing the kubeconfigs and the agent's token, until Ctrl-C.
# Pass --exit to stop right after the walk-through.
# agentguard runs as a process of the demo: if it dies, the demo says so with the end of its log
# and exits non-zero, rather than going on with every agent request failing unexplained.
#
# hack/demo.sh --cluster [--exit]: the product as it is installed instead: builds the image
# (hack/image.sh), starts a one-node cluster (kube-scheduler, kubelet, kube-proxy, containerd;
# needs root), `helm install`s the chart with its defaults from that image, and walks the same
# story against the three agentguard pods.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(hack/k8s-binaries.sh)"
export KUBE_APISERVER KUBE_CONTROLLER_MANAGER ETCD KUBECTL HELM
if [[ ${1:-} == --cluster ]]; then
  shift
  eval "$(hack/node.sh)"
  eval "$(hack/image.sh)"
  export KUBE_SCHEDULER KUBELET KUBE_PROXY CONTAINERD CTR CNI_BIN_DIR IPTABLES \
    AGENTGUARD_IMAGE AGENTGUARD_IMAGE_ARCHIVE PAUSE_IMAGE PAUSE_IMAGE_ARCHIVE
  exec cargo test --locked --quiet --test cluster -- --demo "$@"
fi
exec cargo test --locked --quiet --test demo -- "$@"
