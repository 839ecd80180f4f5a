"""Side-by-side bench of two source trees in one run: did a change make anything slower?

    python benchmarks/before_after.py BEFORE_TREE AFTER_TREE --out DIR [bench options...]

Each tree must hold a built kdkernels (``setup.py build_ext --inplace``). The bench
(``python -m kdkernels.bench``) runs twice per tree, interleaved (before, after, before, after), with
each tree first on PYTHONPATH, so slow drift of the machine hits both trees alike. The table joins
the runs on (loss, case, impl) and prints the fused step time of each tree (the better of its two
runs), the ratio after / before, and both trees' speedup over the eager composition (the ``eager``
impl of the same run, ``vs_eager_step``), which is immune to drift between runs. Writes DIR/before_after.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import pathlib
import subprocess
import sys


def run_bench(tree: pathlib.Path, out: pathlib.Path, bench_args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, "-m", "kdkernels.bench", "--out", str(out), *bench_args], env=env, check=True,
                   cwd=tree, stdout=subprocess.DEVNULL)
    with open(out / "results.csv", newline="") as f:
        return {(r["loss"], r["case"], r["impl"]): r for r in csv.DictReader(f) if r["status"] == "ok"}


def best(runs: list[dict], key) -> dict | None:
    rows = [r[key] for r in runs if key in r]
    return min(rows, key=lambda r: float(r["step_ms"])) if rows else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=pathlib.Path)
    p.add_argument("after", type=pathlib.Path)
    p.add_argument("--out", type=pathlib.Path, required=True)
    args, bench_args = p.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {"before": [], "after": []}
    for i in range(2):
        for name in ("before", "after"):
            tree = getattr(args, name).resolve()
            print(f"run {i + 1}/2: {name} ({tree})", flush=True)
            runs[name].append(run_bench(tree, args.out / f"{name}_{i}", bench_args))
    keys = sorted({k for r in runs["after"] for k in r} & {k for r in runs["before"] for k in r})
    table = []
    for key in keys:
        b, a = best(runs["before"], key), best(runs["after"], key)
        table.append(dict(loss=key[0], case=key[1], impl=key[2], before_step_ms=float(b["step_ms"]),
                          after_step_ms=float(a["step_ms"]),
                          after_over_before=float(a["step_ms"]) / float(b["step_ms"]),
                          before_vs_eager=b["vs_eager_step"], after_vs_eager=a["vs_eager_step"]))
    with open(args.out / "before_after.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print(f"{'loss':22} {'case':34} {'impl':6} {'before ms':>10} {'after ms':>10} {'after/before':>12} "
          f"{'x eager (before)':>16} {'x eager (after)':>15}")
    for r in table:
        print(f"{r['loss']:22} {r['case'][:34]:34} {r['impl']:6} {r['before_step_ms']:10.3f} {r['after_step_ms']:10.3f} "
              f"{r['after_over_before']:12.3f} {float(r['before_vs_eager'] or 'nan'):16.2f} "
              f"{float(r['after_vs_eager'] or 'nan'):15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
