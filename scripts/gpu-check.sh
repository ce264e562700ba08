#!/usr/bin/env bash
# gpu-check.sh: checks runner-example's cuda backend on a machine with an NVIDIA GPU.
#
# Builds runner-example with --features cuda (release), makes 4 models of 64 MiB, starts the
# runner with --backend cuda --capacity 3, and loads the 4 models through HTTP. Prints load
# (miss) times against hit times, and GPU memory (nvidia-smi) and the runner's resident bytes
# (/hints) after every step. Fails (exit 1) unless:
#   * every load raises GPU memory by about a model, and /hints counts exactly 1, 2, 3 models;
#   * the 4th load evicts the least recently used model: /hints counts 3 models, GPU memory
#     drops by about a model while the 4th loads and ends where it was, not a model higher;
#   * hits are hits (x-cache: hit, load_ms 0) and faster than the loads; the evicted model
#     misses again;
#   * every cuda answer matches the cpu backend's answer on the same model and prompt (same
#     argmax, logits within 2e-3);
#   * the runner drains and exits 0 on SIGTERM;
#   * with a warm tier (--host-cache-mb), a model evicted from the GPU is listed as `warm` in
#     /hints (not as a hint) and loads again faster than its first load.
# Then prints the load ratios of backend-bench (cuda): cold load against min(page-cache read,
# pinned host-to-device copy), warm re-load against the pinned copy (targets: >= 0.7), unless
# RATIOS=0.
#
# Needs: an NVIDIA driver (libcuda.so.1, nvidia-smi), cuBLAS 12 (libcublas.so.12: a CUDA 12
# toolkit's lib64, or `pip install nvidia-cublas-cu12`; no nvcc or other toolkit part is
# needed), curl, and cargo unless BIN_DIR is given. The script looks for libcublas.so.12 in
# the usual places and adds its directory to LD_LIBRARY_PATH when the loader cannot find it.
#
# Environment:
#   DEVICE=N      GPU to use, as nvidia-smi numbers them (default 0)
#   SIZE_MB=M     size of each model in MiB (default 64)
#   BIN_DIR=DIR   use runner-example and make-models from DIR instead of building them
#   KEEP=1        keep the temporary directory (models, logs) and print where it is
#   RATIOS=0      skip the backend-bench ratios (they make a 1 GiB model too)
#   RATIO_SIZES=M,N  model sizes of the ratios in MiB (default SIZE_MB,1024)
#
# Run from anywhere: scripts/gpu-check.sh
set -euo pipefail

DEVICE=${DEVICE:-0}
SIZE_MB=${SIZE_MB:-64}
COUNT=4
CAPACITY=3
PROMPT="gpu check"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# CUDA numbers GPUs fastest first unless told otherwise; nvidia-smi by PCI bus.
export CUDA_DEVICE_ORDER=PCI_BUS_ID

failures=0
pids=()
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")

cleanup() {
    local pid
    for pid in ${pids[@]+"${pids[@]}"}; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '%s\n' "$*"; }
die() {
    printf 'gpu-check: %s\n' "$*" >&2
    exit 1
}
fail() {
    printf 'MISMATCH: %s\n' "$*" >&2
    failures=$((failures + 1))
}

for tool in curl nvidia-smi awk sed grep; do
    command -v "$tool" >/dev/null 2>&1 || die "needs $tool on PATH"
done

# --- cuBLAS ---------------------------------------------------------------------------
cublas_found() {
    ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.12 ' && return 0
    local dir
    local -a dirs
    IFS=: read -r -a dirs <<<"${LD_LIBRARY_PATH:-}"
    for dir in "${dirs[@]}"; do
        [[ -n "$dir" && -e "$dir/libcublas.so.12" ]] && return 0
    done
    return 1
}
if ! cublas_found; then
    candidates=(/usr/local/cuda/lib64 /usr/local/cuda-12*/lib64 /usr/lib/x86_64-linux-gnu)
    if command -v python3 >/dev/null 2>&1; then
        pydir=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null || true)
        [[ -n "$pydir" ]] && candidates+=("$pydir")
    fi
    for dir in "${candidates[@]}"; do
        if [[ -e "$dir/libcublas.so.12" ]]; then
            export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            say "using cuBLAS from $dir"
            break
        fi
    done
    cublas_found || die "cannot find libcublas.so.12: install cuBLAS 12 (a CUDA 12 toolkit, or pip install nvidia-cublas-cu12) and put its directory in LD_LIBRARY_PATH"
fi

nvidia-smi -i "$DEVICE" --query-gpu=name,memory.total,driver_version --format=csv,noheader >/dev/null 2>&1 ||
    die "nvidia-smi cannot see GPU $DEVICE"
say "GPU $DEVICE: $(nvidia-smi -i "$DEVICE" --query-gpu=name,memory.total,driver_version --format=csv,noheader)"

# --- build ----------------------------------------------------------------------------
if [[ -n "${BIN_DIR:-}" ]]; then
    bin=$BIN_DIR
else
    say "building runner-example with --features cuda (release)..."
    (cd "$ROOT" && cargo build --release -p runner-example --features cuda)
    bin="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
[[ -x "$bin/runner-example" && -x "$bin/make-models" ]] || die "no runner-example and make-models in $bin"

# --- models ---------------------------------------------------------------------------
"$bin/make-models" --dir "$work/models" --count "$COUNT" --size-mb "$SIZE_MB"
weight_bytes=$(grep -m1 '"weight_bytes"' "$work/models/manifest.json" | sed 's/[^0-9]//g')
[[ -n "$weight_bytes" ]] || die "no weight_bytes in the manifest"
model_mib=$((weight_bytes >> 20))
say "each model: $weight_bytes bytes of weights ($model_mib MiB)"

# --- helpers --------------------------------------------------------------------------
gpu_used() { nvidia-smi -i "$DEVICE" --query-gpu=memory.used --format=csv,noheader,nounits | head -n1 | tr -d ' '; }

# start_runner NAME ARGS...: starts a runner, sets $addr (and appends its pid to pids).
start_runner() {
    local name=$1
    shift
    "$bin/runner-example" --listen 127.0.0.1:0 --models-dir "$work/models" "$@" \
        >"$work/$name.out" 2>"$work/$name.log" &
    local pid=$!
    pids+=("$pid")
    local i
    for ((i = 0; i < 600; i++)); do
        addr=$(sed -n 's/^listening on //p' "$work/$name.out")
        if [[ -n "$addr" ]]; then
            runner_pid=$pid
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$work/$name.log" >&2
            die "the $name runner exited at start"
        fi
        sleep 0.1
    done
    cat "$work/$name.log" >&2
    die "the $name runner did not start within 60 s"
}

# post ADDR MODEL: runs PROMPT on MODEL; sets status, cache, load_ms, infer_ms, total_ms, output.
post() {
    local time_total
    time_total=$(curl -sS -o "$work/body" -D "$work/headers" -w '%{time_total}' \
        -H 'content-type: application/json' \
        --data "{\"model\":\"$2\",\"prompt\":\"$PROMPT\"}" "http://$1/")
    total_ms=$(awk -v t="$time_total" 'BEGIN { printf "%.1f", t * 1000 }')
    status=$(sed -n '1s/^HTTP\/[0-9.]* \([0-9]*\).*/\1/p' "$work/headers")
    cache=$(sed -n 's/^x-cache: *\([a-z]*\).*/\1/Ip' "$work/headers")
    load_ms=$(sed -n 's/.*"load_ms":\([0-9]*\).*/\1/p' "$work/body")
    infer_ms=$(sed -n 's/.*"infer_ms":\([0-9]*\).*/\1/p' "$work/body")
    output=$(sed -n 's/.*"output":"\([^"]*\)".*/\1/p' "$work/body")
}

# hints ADDR: sets hint_list ("a,b,c") and resident (bytes, 0 when absent).
hints() {
    curl -sS -o "$work/hints" "http://$1/hints"
    hint_list=$(sed -n 's/.*"hints":\[\([^]]*\)\].*/\1/p' "$work/hints" | tr -d '"')
    resident=$(sed -n 's/.*"resident_bytes":\([0-9]*\).*/\1/p' "$work/hints")
    resident=${resident:-0}
}

row() { printf '%-8s %-6s %-5s %8s %9s %9s %9s %13s\n' "$@"; }

# --- cuda runner ----------------------------------------------------------------------
used_before=$(gpu_used)
start_runner cuda --backend cuda --device "$DEVICE" --capacity "$CAPACITY"
cuda_addr=$addr
cuda_pid=$runner_pid
used=$(gpu_used)
say "runner (cuda) on $cuda_addr; GPU memory used: $used_before MiB before it, $used MiB with its CUDA context"
say
row model request cache load_ms infer_ms total_ms gpu_used_MiB resident_MiB
row "" "" "" "" "" "" "$used" 0

declare -A miss_ms cuda_output
prev=$used
for ((i = 0; i < COUNT; i++)); do
    model="model-$i"
    if ((i == COUNT - 1)); then
        # Sample GPU memory while the load that evicts runs: it drops, then rises again.
        nvidia-smi -i "$DEVICE" --query-gpu=memory.used --format=csv,noheader,nounits -lms 10 \
            >"$work/samples" 2>/dev/null &
        sampler=$!
        pids+=("$sampler")
        sleep 0.3
    fi
    post "$cuda_addr" "$model"
    if ((i == COUNT - 1)); then
        sleep 0.3
        kill "$sampler" 2>/dev/null || true
        wait "$sampler" 2>/dev/null || true
    fi
    used=$(gpu_used)
    hints "$cuda_addr"
    row "$model" miss "$cache" "$load_ms" "$infer_ms" "$total_ms" "$used" "$((resident >> 20))"
    [[ "$status" == 200 ]] || fail "$model: status $status: $(cat "$work/body")"
    [[ "$cache" == miss ]] || fail "$model: x-cache $cache on its first request"
    miss_ms[$model]=$total_ms
    cuda_output[$model]=$output
    held=$((i + 1 < CAPACITY ? i + 1 : CAPACITY))
    ((resident == held * weight_bytes)) ||
        fail "$model: /hints resident_bytes $resident, expected $held x $weight_bytes"
    if ((i < CAPACITY)); then
        # A load: memory rises by at least 90% of a model.
        ((10 * (used - prev) >= 9 * model_mib)) ||
            fail "$model: GPU memory rose by $((used - prev)) MiB on load, expected about $model_mib"
    else
        # A load that evicted one: memory is back where it was, give or take half a model...
        ((2 * (used - prev) <= model_mib && 2 * (prev - used) <= model_mib)) ||
            fail "$model: GPU memory went from $prev to $used MiB on a load with an eviction, expected no change"
        # ...and dropped by at least half a model in between (the evicted model freed).
        lowest=$(sort -n "$work/samples" | head -n1 | tr -d ' ')
        lowest=${lowest:-$prev}
        freed_line=$(grep -m1 'freed .* bytes of GPU memory' "$work/cuda.log" || true)
        say "         while loading: lowest GPU memory sampled $lowest MiB"
        [[ -n "$freed_line" ]] && say "         runner: ${freed_line#*] }"
        ((2 * (prev - lowest) >= model_mib)) ||
            fail "$model: GPU memory never dropped below $lowest MiB (from $prev) while evicting a model"
        [[ "$hint_list" == "model-3,model-2,model-1" ]] ||
            fail "hints $hint_list after loading 4 models into 3 slots, expected model-3,model-2,model-1"
    fi
    prev=$used
done

# Hits: the resident models answer without loading, faster than their loads.
for model in model-1 model-2 model-3; do
    post "$cuda_addr" "$model"
    used=$(gpu_used)
    hints "$cuda_addr"
    row "$model" hit "$cache" "$load_ms" "$infer_ms" "$total_ms" "$used" "$((resident >> 20))"
    [[ "$status" == 200 && "$cache" == hit && "$load_ms" == 0 ]] ||
        fail "$model: expected a hit (status $status, x-cache $cache, load_ms $load_ms)"
    [[ "$output" == "${cuda_output[$model]}" ]] || fail "$model: a hit answered differently from its miss"
    awk -v h="$total_ms" -v m="${miss_ms[$model]}" 'BEGIN { exit !(h < m) }' ||
        fail "$model: hit took $total_ms ms, not less than its load ($model ${miss_ms[$model]} ms)"
done

# The evicted model loads again (and evicts model-1, now the least recently used).
post "$cuda_addr" model-0
used=$(gpu_used)
hints "$cuda_addr"
row model-0 again "$cache" "$load_ms" "$infer_ms" "$total_ms" "$used" "$((resident >> 20))"
[[ "$status" == 200 && "$cache" == miss ]] || fail "model-0: expected a miss after its eviction (x-cache $cache)"
((resident == CAPACITY * weight_bytes)) || fail "resident_bytes $resident, expected $CAPACITY x $weight_bytes"

# --- the cpu backend agrees -----------------------------------------------------------
say
start_runner cpu --backend cpu --capacity 1
cpu_addr=$addr
for ((i = 0; i < COUNT; i++)); do
    model="model-$i"
    post "$cpu_addr" "$model"
    say "$model  cuda: ${cuda_output[$model]}"
    say "$model  cpu:  $output"
    if ! awk -v a="${cuda_output[$model]}" -v b="$output" 'BEGIN {
            if (split(a, x, /[]=[,]/) != split(b, y, /[]=[,]/)) exit 1
            if (x[2] != y[2]) exit 1                   # argmax
            for (k = 4; k in x; k++) {                 # logits
                if (x[k] == "" && y[k] == "") continue
                d = x[k] - y[k]; if (d < 0) d = -d
                if (d > 0.002) exit 1
            }
        }'; then
        fail "$model: the cuda answer differs from the cpu answer"
    fi
done

# --- shutdown -------------------------------------------------------------------------
kill -TERM "$cuda_pid"
rc=0
wait "$cuda_pid" || rc=$?
((rc == 0)) || fail "the cuda runner exited with status $rc after SIGTERM"
sleep 1
say
say "GPU memory used after the runner exited: $(gpu_used) MiB (before it started: $used_before MiB)"

# --- warm tier --------------------------------------------------------------------------
# One GPU slot, host room for all models: model-0 evicted by model-1 stays warm on the host.
say
start_runner warm --backend cuda --device "$DEVICE" --capacity 1 --host-cache-mb $((COUNT * (model_mib + 1)))
warm_addr=$addr
post "$warm_addr" model-0
cold_ms=$load_ms
post "$warm_addr" model-1
hints "$warm_addr"
warm_list=$(sed -n 's/.*"warm":\[\([^]]*\)\].*/\1/p' "$work/hints" | tr -d '"')
say "warm tier: hints [$hint_list], warm [$warm_list] after loading model-0 then model-1 into one slot"
[[ "$hint_list" == "model-1" ]] || fail "warm tier: hints $hint_list, expected model-1"
[[ "$warm_list" == "model-0" ]] || fail "warm tier: warm [$warm_list], expected [model-0]"
post "$warm_addr" model-0
say "warm tier: model-0 loaded in $cold_ms ms from disk, $load_ms ms again from host memory"
[[ "$status" == 200 && "$cache" == miss ]] || fail "warm tier: model-0 again: status $status, x-cache $cache"
((load_ms < cold_ms || cold_ms == 0)) || fail "warm tier: the re-load ($load_ms ms) was not faster than the first load ($cold_ms ms)"
[[ "$output" == "${cuda_output[model-0]}" ]] || fail "warm tier: model-0 answered differently after a warm re-load"

# --- ratios -----------------------------------------------------------------------------
if [[ "${RATIOS:-1}" != 0 ]]; then
    say
    if [[ -x "$bin/backend-bench" ]]; then
        sizes=${RATIO_SIZES:-$SIZE_MB,1024}
        say "backend-bench --backends cuda --sizes-mb $sizes (cold and warm loads against the floors)..."
        if "$bin/backend-bench" --backends cuda --sizes-mb "$sizes" --loads 3 --infers 10 --hit-model-mb 0 \
            --device "$DEVICE" --dir "$work/bench" >"$work/bench.md" 2>"$work/bench.log"; then
            cat "$work/bench.md"
            say
            # | cuda | MiB | first ms | x | re-load ms | x | warm ms | x | hit | p90 |
            awk -F'|' '$2 ~ /^ cuda / {
                gsub(/ /, "", $3); gsub(/ /, "", $5); gsub(/ /, "", $7); gsub(/ /, "", $9)
                printf "cuda ratios, %s MiB: cold load %s x min(page-cache read, pinned copy) (re-load %s), warm re-load %s x pinned copy%s\n",
                    $3, $5, $7, $9, ($5 + 0 < 0.7 || $9 + 0 < 0.7) ? "  (below the 0.7 target)" : ""
            }' "$work/bench.md"
        else
            cat "$work/bench.log" >&2
            fail "backend-bench --backends cuda failed"
        fi
    else
        say "no backend-bench in $bin: ratios skipped"
    fi
fi

if ((failures > 0)); then
    say "gpu-check: $failures mismatch(es); runner log:"
    cat "$work/cuda.log"
    exit 1
fi
say "gpu-check: OK"
