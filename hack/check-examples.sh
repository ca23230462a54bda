#!/usr/bin/env bash
# Offline: the example policies judge the example AdmissionReviews with `agentguard check`,
# exactly as the webhook would (no cluster needed).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --quiet
exec target/debug/agentguard --log-format plain check \
  --policies examples/policies/demo.yaml \
  --reviews examples/reviews/*.json \
  --now 2026-11-26T12:10:00Z
