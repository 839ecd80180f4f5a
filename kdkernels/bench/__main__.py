"""``python -m kdkernels.bench`` / ``kdkernels-bench`` / ``make bench``: the command line.

Examples::

    python -m kdkernels.bench                          # preset gpu with a GPU, else cpu (~2 min on 2 cores)
    python -m kdkernels.bench --preset full            # the complete CPU sweep (tens of minutes)
    python -m kdkernels.bench --preset smoke --out /tmp/b
    python -m kdkernels.bench --losses softmax_kl_div --backends eager,compile,cpu
    python -m kdkernels.bench --losses softmax_kl_div --shape 8192x128000 --device cuda
    python -m kdkernels.bench --preset gpu --no-scaling --out benchmarks/results/h200
"""
from __future__ import annotations

import argparse
import sys

from kdkernels.backends import LOSSES
from kdkernels.bench.cases import DTYPES, PRESETS, SHAPE_FORMS
from kdkernels.bench.impls import ALL_IMPLS


def _csv_list(allowed):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad:
            hint = ("; 'torch' is now 'eager' (the usual eager composition, the baseline) or 'reference' "
                    "(kdkernels.reference, the accuracy spec)") if "torch" in bad and "eager" in allowed else ""
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}{hint}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kdkernels.bench",
        description="Time and measure the kdkernels losses against the eager PyTorch composition users write, "
                    "torch.compile of it, torchdistill and Liger, in one run (docs/design.md §5). Writes "
                    "results.json, results.csv, speedup.png and scaling.png to --out.",
        epilog="--shape forms: " + "; ".join(f"{k}: {v}" for k, v in SHAPE_FORMS.items()))
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="cpu (every loss, about 2 minutes on 2 cores), full (the complete CPU sweep, tens of "
                        "minutes), gpu (H100/H200 sizes) or smoke (tiny, < 60 s); "
                        "default: gpu when CUDA is available, else cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="override the preset's device")
    p.add_argument("--losses", type=_csv_list(LOSSES), default=None,
                   help=f"comma-separated subset of {','.join(LOSSES)}")
    p.add_argument("--backends", type=_csv_list(ALL_IMPLS), default=None,
                   help=f"comma-separated subset of {','.join(ALL_IMPLS)} (eager = the usual eager composition, "
                        "the baseline of the vs_eager ratios; compile = torch.compile of it; reference = "
                        "kdkernels.reference, the accuracy spec, never a baseline)")
    p.add_argument("--shape", default=None,
                   help="run just one case of your own size for each of --losses (required with it), e.g. "
                        "8192x128000 for softmax_kl_div (rows x vocab); forms per loss below")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the --shape cases (default: that of the preset's case of the loss)")
    p.add_argument("--out", default="bench_out", help="output directory (default: bench_out/)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--no-scaling", action="store_true", help="skip the sweep over the batch size")
    p.add_argument("--repeats", type=int, default=None, help="minimum timed repeats (median is reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    p.add_argument("--max-case-seconds", type=float, default=None,
                   help="skip an implementation predicted to take longer than this on a case")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which what has not started is reported as skipped (the gpu preset "
                        "defaults to 100 so that it ends inside benchmarks/gpu_check.sh; 0: no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads) for the bench and its memory workers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from kdkernels.bench import cases, report, runner

    name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = cases.get_preset(name, args.device)
    if args.dtype is not None and args.shape is None:
        print("kdkernels bench: --dtype applies to --shape cases only", file=sys.stderr)
        return 2
    if args.shape is not None:
        if not args.losses:
            print("kdkernels bench: --shape needs --losses (a shape means different things per loss: "
                  + "; ".join(f"{k}: {v}" for k, v in SHAPE_FORMS.items()) + ")", file=sys.stderr)
            return 2
        try:
            preset.cases = cases.shape_cases(preset, args.losses, args.shape, args.dtype)
        except ValueError as e:
            print(f"kdkernels bench: {e}", file=sys.stderr)
            return 2
    if args.threads:
        preset.threads = args.threads
    if args.no_scaling:
        preset.cases = [c for c in preset.cases if c.group != "scaling"]
    if args.repeats is not None:
        preset.min_repeats = max(1, args.repeats)
        preset.max_repeats = max(preset.max_repeats, preset.min_repeats)
    if args.warmup is not None:
        preset.warmup = max(0, args.warmup)
    if args.max_case_seconds is not None:
        preset.max_case_s = args.max_case_seconds
    if args.time_limit is not None:
        preset.time_limit_s = args.time_limit if args.time_limit > 0 else None
    try:
        result = runner.run(preset, args.losses, args.backends, memory=not args.no_memory,
                            on_case=lambda partial: report.write_data(partial, args.out))
    except RuntimeError as e:
        print(f"kdkernels bench: {e}", file=sys.stderr)
        return 2
    paths = report.write_all(result, args.out)
    print()
    print(report.full_report(result), flush=True)
    print()
    print(f"done in {result['meta']['elapsed_s']:.0f} s; wrote " + ", ".join(paths.values()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
