"""``python -m kdkernels.demo [--seeds N] [--epochs E] [--out DIR] [--quick]``."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import kdkernels
from kdkernels.demo import data, models, report
from kdkernels.demo.distill import DistillLoss, Weights
from kdkernels.demo.train import Config, train_distilled, train_plain

STUDENT_SEED_OFFSET = 1000  # the student's initialisation differs from the teacher's


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kdkernels.demo", description=__doc__)
    p.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1 (default 5)")
    p.add_argument("--epochs", type=int, default=20, help="epochs for every model (default 20)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="results.json and the plot (default demo_out/)")
    p.add_argument("--quick", action="store_true", help="a tiny run: 1 seed, 3 epochs (the test's mode)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for both backends (default 1: the models are tiny, a second "
                        "thread saves ~20%% on an idle 2-core machine but makes OpenMP stall badly on a busy one; "
                        "0 = torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 3
    if args.seeds < 1 or args.epochs < 1 or args.threads < 0:
        p.error("--seeds and --epochs must be >= 1, --threads >= 0")
    return args


def run_seed(seed: int, digits: data.Digits, cfg: Config, weights: Weights) -> dict:
    torch.manual_seed(seed)
    teacher = models.teacher()
    out = {"seed": seed, "teacher": train_plain(teacher, digits, cfg, seed)}
    torch.manual_seed(seed + STUDENT_SEED_OFFSET)
    out["student"] = train_plain(models.student(), digits, cfg, seed)
    # the same student initialisation and batch order for both backends; alternate which runs first
    order = [("distilled", "auto"), ("distilled_eager", "eager")]
    for key, backend in order if seed % 2 == 0 else order[::-1]:
        torch.manual_seed(seed + STUDENT_SEED_OFFSET)
        student = models.student()
        loss_fn = DistillLoss(student.channels, teacher.channels, weights, backend=backend)
        out[key] = train_distilled(student, teacher, loss_fn, digits, cfg, seed)
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    digits, cfg, weights = data.load(), Config(epochs=args.epochs), Weights()
    auto = kdkernels.backends.resolve("softmax_kl_div", "auto", torch.device("cpu"))
    t, s = models.teacher(), models.student()
    print(f"kdkernels demo: digits, {len(digits.y_train)} train / {len(digits.y_test)} test 8x8 images "
          f"(stratified split), {args.seeds} seed(s) x {args.epochs} epochs, {torch.get_num_threads()} torch thread(s)")
    print(f"  teacher CNN {models.num_params(t):,} params, student CNN {models.num_params(s):,} params")
    print(f"  distilled = cross-entropy + {weights.kd} x SoftmaxKLDivLoss(T={weights.temperature}) + "
          f"{weights.hint} x ProjectedMSELoss({s.channels}->{t.channels} ch, 4x4 maps) + "
          f"{weights.relation} x RKDLoss(embeddings {s.emb_dim} / {t.emb_dim})")
    seeds = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        r = run_seed(seed, digits, cfg, weights)
        seeds.append(r)
        print(f"  seed {seed}: teacher {r['teacher'].final:.4f}  student alone {r['student'].final:.4f}  "
              f"distilled {r['distilled'].final:.4f} (eager losses {r['distilled_eager'].final:.4f})  "
              f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    summary = report.summarize(seeds)
    report.print_summary(summary, args.epochs, auto)
    args.out.mkdir(parents=True, exist_ok=True)
    report.plot(seeds, args.out / "learning_curves.png")
    total = time.perf_counter() - start
    meta = {"seeds": args.seeds, "epochs": args.epochs, "config": vars(cfg), "weights": weights.as_dict(),
            "auto_backend": auto, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "n_train": len(digits.y_train), "n_test": len(digits.y_test), "total_s": total}
    report.write_json(args.out / "results.json", meta, summary, seeds)
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'learning_curves.png'}; total wall time {total:.1f} s")
    return summary


if __name__ == "__main__":
    main()
