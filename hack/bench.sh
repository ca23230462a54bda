#!/usr/bin/env bash
# Load benchmark of the webhook: agentguard's router and a do-nothing webhook on the same TLS and
# HTTP stack (examples/bench_webhook.rs), driven by the same client (wrk) in the same run, over
# each body of examples/reviews and benches/reviews. Prints req/s, p50 and p99 of both and their
# ratios, and what agentguard logged.
#
#   hack/bench.sh            release build, 10 s per body and server, 64 connections
#   hack/bench.sh --smoke    dev build, every body checked once, 1 s of load on three: proves the
#                            benchmark works (no timing is judged)
#
# Environment: BENCH_DURATION (seconds, default 10), BENCH_CONNECTIONS (64), BENCH_THREADS (1),
# AGENTGUARD_LOG (agentguard's log filter, default info).
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
case "${1:-}" in
  --smoke) smoke=true ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

duration=${BENCH_DURATION:-10}
connections=${BENCH_CONNECTIONS:-64}
threads=${BENCH_THREADS:-1}
bodies=(examples/reviews/*.json benches/reviews/*.json)
loaded=("${bodies[@]}")
if $smoke; then
  duration=1 connections=8
  loaded=(examples/reviews/01-agent-deletes-deployment.json examples/reviews/10-human-deletes-deployment.json
    benches/reviews/agent-updates-deployment-image.json)
fi

# The load generator, and what checks the answers: Debian packages of the same names.
missing=()
for tool in wrk curl jq; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  echo "installing ${missing[*]} (Debian packages)" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

if $smoke; then
  # cargo test has built the dev profile already: this costs a link at most.
  cargo build --locked --quiet --example bench_webhook
  bin=target/debug/examples/bench_webhook
else
  cargo build --locked --quiet --release --example bench_webhook
  bin=target/release/examples/bench_webhook
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# start NAME ARGS...: runs the server, waits until it listens, sets $addr.
start() {
  local name=$1; shift
  : >"$tmp/$name.out" # read below before the server's own redirection may have made it
  "$bin" "$@" >"$tmp/$name.out" 2>"$tmp/$name.log" &
  pids+=($!)
  for _ in $(seq 100); do
    addr=$(sed -n 's/^listening on //p' "$tmp/$name.out")
    [[ -n $addr ]] && return
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "$name did not start:" >&2
  cat "$tmp/$name.log" >&2
  exit 1
}
start noop noop
noop=$addr
start agentguard agentguard examples/policies/demo.yaml
agentguard=$addr

# answer URL BODY: the AdmissionReview answer, checked to be one for this request.
answer() {
  local out uid
  out=$(curl -sS --insecure --fail -H 'Content-Type: application/json' --data-binary "@$2" "https://$1/validate")
  uid=$(jq -r .request.uid "$2")
  [[ $(jq -r .response.uid <<<"$out") == "$uid" ]] || { echo "wrong answer from $1 for $2: $out" >&2; exit 1; }
  printf '%s' "$out"
}

# load URL BODY: "req/s p50_ms p99_ms" under wrk.
load() {
  local script="$tmp/post.lua" out
  cat >"$script" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("$2", "rb"))
wrk.body = f:read("*a")
f:close()
EOF
  out=$(wrk -t"$threads" -c"$connections" -d"${duration}s" --latency -s "$script" "https://$1/validate")
  if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
    echo "errors under load from $1 for $2:" >&2
    echo "$out" >&2
    exit 1
  fi
  awk '
    function ms(v) {
      if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
      if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
      if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
      return v
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    $1 == "Requests/sec:" { rps = $2 }
    END { if (rps == "" || p99 == "") exit 1; printf "%.0f %.2f %.2f\n", rps, p50, p99 }
  ' <<<"$out"
}

for body in "${bodies[@]}"; do
  answer "$noop" "$body" >/dev/null
  answer "$agentguard" "$body" >"$tmp/answer.json"
  jq -r '"\(.response.allowed) \(.response.status.code // 200)"' "$tmp/answer.json" >"$tmp/$(basename "$body").answer"
done
echo "every body answered by both servers with its own uid" >&2

echo "wrk -t$threads -c$connections -d${duration}s --latency, POST https://127.0.0.1:PORT/validate ($(nproc) cores)"
echo
echo "| body | agentguard answers | do-nothing req/s | agentguard req/s | ratio | do-nothing p50 / p99 ms | agentguard p50 / p99 ms | p99 ratio |"
echo "|---|---|---|---|---|---|---|---|"
for body in "${loaded[@]}"; do
  read -r n_rps n_p50 n_p99 < <(load "$noop" "$body")
  read -r a_rps a_p50 a_p99 < <(load "$agentguard" "$body")
  read -r allowed code <"$tmp/$(basename "$body").answer"
  if [[ $allowed == true ]]; then verdict=allowed; else verdict="refused ($code)"; fi
  awk -v b="$(basename "$body" .json)" -v v="$verdict" -v nr="$n_rps" -v n50="$n_p50" -v n99="$n_p99" \
    -v ar="$a_rps" -v a50="$a_p50" -v a99="$a_p99" 'BEGIN {
      printf "| %s | %s | %d | %d | %.2f | %.2f / %.2f | %.2f / %.2f | %.2f |\n",
        b, v, nr, ar, ar / nr, n50, n99, a50, a99, a99 / n99
    }'
done
echo
echo "agentguard logged $(wc -l <"$tmp/agentguard.log") lines, $(du -h "$tmp/agentguard.log" | cut -f1)B"
