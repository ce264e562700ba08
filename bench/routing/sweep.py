#!/usr/bin/env python3
"""Random cluster shapes through `simulate`: where does hint-router lose to Envoy's policies?

The benchmark's points are a handful of shapes; results are also judged on shapes and seeds it
does not use. This draws SHAPES random clusters (runners, slots, max_concurrency, models, load
and inference times, workload, seed) from SEED, runs `simulate` at 30 / 60 / 90 % of each, and
prints how often `fastest` (and `any_available`) falls below the best Envoy policy, with the
worst points. `--compare OLD.jsonl` prints, point by point, how the hint policies moved against
an earlier run of the same shapes (same SEED and SHAPES).

    cargo build --release -p hint-router-bench-routing --bin simulate
    python3 bench/routing/sweep.py --seed 11 --shapes 100 --out target/bench/sweep.jsonl
    python3 bench/routing/sweep.py --seed 11 --shapes 100 --out new.jsonl --compare target/bench/sweep.jsonl

Standard library only. Each shape takes a few seconds of CPU.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

ENVOY = ["RoundRobin", "LeastRequest", "RingHash", "RingHashBounded"]
WORKLOADS = ["zipf0.8", "zipf1.0", "zipf1.2", "shift1.0", "uniform"]


def shapes(seed, count):
    """The same `count` shapes for the same `seed`."""
    rng = random.Random(seed)
    for _ in range(count):
        runners = rng.choice([2, 3, 4, 5, 6, 8, 12, 16, 100])
        shape = {
            "runners": runners,
            "capacity": rng.choice([1, 2, 3, 4]),
            "max-concurrency": rng.choice([1, 1, 2, 4]),
            "models": rng.choice([6, 12, 24, 50, 100, 300] if runners < 100 else [500, 1000, 3000]),
            "load-ms": rng.choice([100, 200, 500, 1000]),
            "infer-ms": rng.choice([10, 20, 50]),
            "seed": rng.randint(10, 10000),
        }
        yield shape, rng.choice(WORKLOADS)


def run(simulate, shape, workload, policies):
    """One shape's three points: a list of {shape, point, bounds, sim: {policy: figures}}."""
    args = [simulate, "--points", ",".join(f"{workload}@{p}" for p in (30, 60, 90))]
    args += ["--measure-s", "60" if shape["runners"] <= 32 else "30", "--warmup-s", "20"]
    args += ["--max-inflight", "1000000", "--policies", policies]
    for k, v in shape.items():
        args += [f"--{k}", str(v)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        subprocess.run(args + ["--json", path], check=True, capture_output=True)
        with open(path) as f:
            doc = json.load(f)
    keep = ("hit_rate", "prompt_hit_rate", "mean_ms", "p99_ms", "errors", "timeouts")
    return [
        {
            "shape": shape,
            "point": p["name"],
            "bounds": p["bounds"],
            "sim": {s["policy"]: {k: s.get(k) for k in keep} for s in p["sim"]},
        }
        for p in doc.get("points", [])
    ]


def label(rec):
    s = rec["shape"]
    return (f"{s['runners']}x{s['capacity']} M{s['max-concurrency']} {s['models']} models "
            f"load {s['load-ms']} infer {s['infer-ms']} seed {s['seed']} {rec['point']}")


def summary(recs):
    rows = []
    for r in recs:
        sim = r["sim"]
        envoy = [sim[e] for e in ENVOY if e in sim]
        if "HintFastest" not in sim or not envoy:
            continue
        best_hit = max(e["hit_rate"] for e in envoy)
        # Hits that did not wait behind another request's inference: the only hits fal's rule
        # (`any_available`) lets a router take. Absent from runs made before it was recorded.
        prompts = [e.get("prompt_hit_rate") for e in envoy]
        best_prompt = max(prompts) if None not in prompts else None
        best_mean = min(e["mean_ms"] for e in envoy)
        best_p99 = min(e["p99_ms"] for e in envoy)
        f, a = sim["HintFastest"], sim.get("Hint", sim["HintFastest"])
        rows.append({
            "rec": r,
            "hit": 100 * (f["hit_rate"] - best_hit),
            "any_hit": 100 * (a["hit_rate"] - best_hit),
            "any_prompt": None if best_prompt is None else 100 * (a["hit_rate"] - best_prompt),
            "mean": f["mean_ms"] / best_mean,
            "p99": f["p99_ms"] / best_p99,
            "vs_any": f["mean_ms"] / a["mean_ms"],
        })
    n = len(rows)
    print(f"{n} points ({n // 3} shapes); best Envoy = the best of {', '.join(ENVOY)} at each point")
    print("| | points |")
    print("| --- | --- |")
    for name, count in [
        ("`fastest` hit rate below the best Envoy's by more than 1 point", sum(x["hit"] < -1 for x in rows)),
        ("`fastest` mean latency above the best Envoy's (x1.05 or more)", sum(x["mean"] >= 1.05 for x in rows)),
        ("`fastest` p99 above the best Envoy's (x1.05 or more)", sum(x["p99"] >= 1.05 for x in rows)),
        ("`any_available` hit rate below the best Envoy's by more than 1 point", sum(x["any_hit"] < -1 for x in rows)),
        ("`any_available` hit rate below the best Envoy's hits that did not wait, by more than 1 point",
         sum(x["any_prompt"] is not None and x["any_prompt"] < -1 for x in rows)),
        ("`fastest` mean above `any_available`'s (x1.05 or more)", sum(x["vs_any"] >= 1.05 for x in rows)),
    ]:
        print(f"| {name} | {count} |")
    if rows:
        gm = statistics.geometric_mean(max(x["mean"], 1e-9) for x in rows)
        print(f"\n`fastest` mean / best Envoy mean: geometric mean {gm:.2f}, "
              f"median {statistics.median(x['mean'] for x in rows):.2f}")
    print("\nworst `fastest` hit rate against the best Envoy's (points):")
    for x in sorted(rows, key=lambda x: x["hit"])[:8]:
        print(f"  {x['hit']:+6.1f}  mean x{x['mean']:.2f}  p99 x{x['p99']:.2f}  {label(x['rec'])}")
    print("worst `fastest` mean against the best Envoy's:")
    for x in sorted(rows, key=lambda x: -x["mean"])[:8]:
        print(f"  x{x['mean']:.2f}  hit {x['hit']:+6.1f}  p99 x{x['p99']:.2f}  {label(x['rec'])}")


def compare(old, new):
    key = lambda r: (json.dumps(r["shape"], sort_keys=True), r["point"])
    before = {key(r): r for r in old}
    for policy, name in [("HintFastest", "fastest"), ("Hint", "any_available")]:
        moves = []
        for r in new:
            o = before.get(key(r))
            if o and policy in o["sim"] and policy in r["sim"]:
                a, b = o["sim"][policy], r["sim"][policy]
                moves.append((100 * (b["hit_rate"] - a["hit_rate"]), b["mean_ms"] / max(a["mean_ms"], 1e-9), r))
        if not moves:
            continue
        gm = statistics.geometric_mean(max(m[1], 1e-9) for m in moves)
        print(f"\n{name}, {len(moves)} points: hit rate {statistics.mean(m[0] for m in moves):+.2f} points on "
              f"average ({sum(m[0] > 1 for m in moves)} up by over a point, {sum(m[0] < -1 for m in moves)} "
              f"down); mean latency x{gm:.3f} (geometric mean)")
        for m in sorted(moves, key=lambda m: m[0])[:5]:
            print(f"  {m[0]:+6.1f} points  mean x{m[1]:.2f}  {label(m[2])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--shapes", type=int, default=100)
    ap.add_argument("--out", default="target/bench/sweep.jsonl")
    ap.add_argument("--compare", help="an earlier --out of the same shapes")
    ap.add_argument("--simulate", default="target/release/simulate")
    ap.add_argument("--policies", default="all")
    a = ap.parse_args()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    recs = []
    with open(a.out, "w") as out:
        for k, (shape, workload) in enumerate(shapes(a.seed, a.shapes)):
            for rec in run(a.simulate, shape, workload, a.policies):
                out.write(json.dumps(rec) + "\n")
                recs.append(rec)
            print(f"\r{k + 1}/{a.shapes} shapes", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    summary(recs)
    if a.compare:
        with open(a.compare) as f:
            compare([json.loads(line) for line in f], recs)


if __name__ == "__main__":
    main()
