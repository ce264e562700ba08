#!/usr/bin/env bash
# `make up`: starts three runners (127.0.0.1:18081-18083) and Envoy (127.0.0.1:10000, admin
# 127.0.0.1:9901) with the demo config envoy/demo.yaml (debug headers on: responses say which
# runner answered; production uses envoy/envoy.yaml) and keeps them running until Ctrl-C.
# Runner flags can be changed with RUNNER_ARGS, e.g. RUNNER_ARGS="--load-ms 500".
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .run
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped."
}
trap cleanup EXIT
trap "exit 130" INT TERM

read -r -a extra <<<"${RUNNER_ARGS:---load-ms 1000 --infer-ms 50}"
for port in 18081 18082 18083; do
  ./target/release/runner-example --listen "127.0.0.1:$port" "${extra[@]}" >".run/runner-$port.log" 2>&1 &
  pids+=($!)
done
.venv/bin/envoy -c envoy/demo.yaml --concurrency 2 --log-path .run/envoy.log &
pids+=($!)

deadline=$((SECONDS + 60))
until curl -sf http://127.0.0.1:9901/ready >/dev/null 2>&1; do
  if ((SECONDS > deadline)); then echo "Envoy not ready; see .run/envoy.log"; exit 1; fi
  sleep 0.2
done
cat <<'MSG'
Stack up: Envoy on http://127.0.0.1:10000 (admin http://127.0.0.1:9901), runners on 18081-18083.
Logs in .run/. (Demo config: responses carry x-hint-router-upstream/-decision and x-cache.) Try:
  curl -si http://127.0.0.1:10000/ -H 'x-fal-runner-hint: llama' -d '{"model":"llama","prompt":"hi"}'
  curl -s http://127.0.0.1:9901/stats | grep hint_router
fal_client: FAL_RUN_HOST=127.0.0.1:10443 (run) and FAL_QUEUE_RUN_HOST=127.0.0.1:10444 (submit,
status, result, cancel), with SSL_CERT_FILE=target/dev-tls/cert.pem and any FAL_KEY.
Ctrl-C stops everything.
MSG
wait
