#!/usr/bin/env bash
# Interleaved A/B of the decision micro-benchmarks (bench/overhead/benches/decision.rs): this
# checkout against git revision REV, both binaries run in turn, ROUNDS times each, pinned to
# one core. Prints each case's fastest median over the rounds, before and after, and the ratio.
# (This machine's noise moves one criterion run by 10-30 %; the minimum over interleaved
# rounds moves by a few per cent.)
#
#   scripts/decision-ab.sh REV [FILTER] [ROUNDS]     e.g. scripts/decision-ab.sh HEAD~1 'router/hit' 5
set -euo pipefail
rev=${1:?usage: decision-ab.sh REV [FILTER] [ROUNDS]}
filter=${2:-}
rounds=${3:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$root/target/decision-ab
mkdir -p "$work"

bench_binary() { # DIR TARGET_DIR -> path of the built decision benchmark
  (cd "$1" && CARGO_TARGET_DIR=$2 cargo bench --locked -p hint-router-bench-overhead --bench decision --no-run 2>&1) |
    sed -n 's/.*Executable benches\/decision.rs (\(.*\))/\1/p' | tail -1
}

old_tree=$work/tree
rm -rf "$old_tree"
git -C "$root" worktree prune
git -C "$root" worktree add -q --detach "$old_tree" "$rev"
trap 'git -C "$root" worktree remove --force "$old_tree" >/dev/null 2>&1 || true' EXIT
old_bin=$(bench_binary "$old_tree" "$work/target")
new_bin=$(bench_binary "$root" "$root/target")
[ -x "$old_bin" ] && [ -x "$new_bin" ] || { echo "decision-ab: could not build both benchmarks" >&2; exit 1; }
cp "$old_bin" "$work/before"
cp "$new_bin" "$work/after"

pin=()
command -v taskset >/dev/null && pin=(taskset -c "$(($(nproc) - 1))")
: >"$work/runs.txt"
for _ in $(seq "$rounds"); do
  for side in before after; do
    "${pin[@]}" "$work/$side" --bench --warm-up-time 1 --measurement-time 2 $filter 2>/dev/null |
      awk -v side="$side" '
        # A long name gets a line of its own, "time:" then leads the next.
        $1 == "time:" { print side, name, $4, $5; next }
        /time:/ { print side, $1, $5, $6; next }
        NF == 1 { name = $1 }' >>"$work/runs.txt"
  done
done

# Criterion prints "name time: [low unit median unit high unit]"; scale medians to ns.
awk '
  function ns(v, u) { return u == "ps" ? v / 1000 : u == "us" || u == "µs" ? v * 1000 : u == "ms" ? v * 1e6 : v }
  { t = ns($3, $4); k = $2; if (!((k, $1) in best) || t < best[k, $1]) best[k, $1] = t; cases[k] = 1 }
  END {
    printf "%-28s %12s %12s %8s\n", "case (fastest of rounds)", "before ns", "after ns", "ratio"
    for (k in cases) printf "%-28s %12.1f %12.1f %8.2f\n", k, best[k, "before"], best[k, "after"], best[k, "after"] / best[k, "before"]
  }' "$work/runs.txt" | sort
