#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, generated-file drift, unit and router
# tests, a fuzz smoke, then the end-to-end tests against a real kube-apiserver when its binaries
# can be built.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings (and the suites cargo test skips: chart, demo, e2e, cluster, soak, scale, apibench)"
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --test chart --test demo --test e2e --test cluster --test soak --test scale --test apibench -- -D warnings

step "generated CRDs match the Rust types"
cargo run --locked --quiet -- crds | diff -u charts/agentguard/crds/crds.yaml - \
  || { echo "charts/agentguard/crds/crds.yaml is stale: run 'cargo run -- crds > charts/agentguard/crds/crds.yaml'" >&2; exit 1; }

step "cargo test (unit, router, CEL and TLS tests)"
cargo test --locked

step "policy unit tests of the examples and the policy library (agentguard check --test)"
cargo run --locked --quiet -- --log-format plain check --test examples/tests/demo.yaml examples/tests/library.yaml examples/tests/approvals.yaml

step "load benchmark smoke run (hack/bench.sh --smoke: both webhooks answer every example under wrk)"
hack/bench.sh --smoke

step "fuzz smoke: every fuzz target for a few seconds from its seed corpus (hack/fuzz.sh, docs/fuzzing.md)"
hack/fuzz.sh --smoke

step "Kubernetes binaries: kube-apiserver, kube-controller-manager, etcd, kubectl, helm from pinned Go modules (cached by version)"
eval "$(hack/k8s-binaries.sh)"
export KUBE_APISERVER KUBE_CONTROLLER_MANAGER ETCD KUBECTL HELM PROMETHEUS_OPERATOR_CRDS CERT_MANAGER_CRDS CROSSPLANE_AWS_CRDS

step "benchmark through the API server, smoke run (hack/bench-apiserver.sh --smoke: no admission, agentguard and a ValidatingAdmissionPolicy each answer every DELETE as expected under wrk)"
hack/bench-apiserver.sh --smoke

step "helm lint, and manifests/install.yaml matches the chart"
"$HELM" lint --strict charts/agentguard
"$HELM" lint --strict charts/agentguard --set prometheusRule.enabled=true --set grafanaDashboard.enabled=true \
  --set serviceMonitor.enabled=true
"$HELM" lint --strict charts/agentguard --set certManager.enabled=true
hack/render-manifests.sh --check

step "the Helm chart on a real control plane (install, RBAC, monitoring and cert-manager objects, agentguard down, upgrade, uninstall)"
cargo test --locked --test chart

step "the quick start's demo runs to the end"
cargo test --locked --test demo -- --exit
step "the demo stops and says so when agentguard dies part-way"
cargo test --locked --test demo -- --agentguard-dies

step "soak smoke: five minutes of mixed traffic, agentguard's memory, files and threads flat (hack/soak.sh --smoke)"
hack/soak.sh --smoke

step "end-to-end tests against a real kube-apiserver, kube-controller-manager and etcd"
cargo test --locked --test e2e

step "the chart on a one-node cluster: the image built here, run by kubelet and containerd (install, deny/approve, rollout restart under load, replicas killed, PDB, upgrade, uninstall)"
eval "$(hack/k8s-binaries.sh)"
eval "$(hack/node.sh)"
eval "$(hack/image.sh)"
export KUBE_SCHEDULER KUBELET KUBE_PROXY CONTAINERD CTR CNI_BIN_DIR IPTABLES \
  AGENTGUARD_IMAGE AGENTGUARD_IMAGE_ARCHIVE PAUSE_IMAGE PAUSE_IMAGE_ARCHIVE
cargo test --locked --test cluster
