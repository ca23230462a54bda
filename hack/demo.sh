#!/usr/bin/env bash
# Offline walk-through: the example policies judge the example AdmissionReviews (an agent's
# delete is held, a human approves, the approved delete passes, ...), exactly as the webhook would.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --quiet
exec target/debug/agentguard --log-format plain check \
  --policies examples/policies/demo.yaml \
  --reviews examples/reviews/*.json \
  --now 2026-11-26T12:10:00Z
