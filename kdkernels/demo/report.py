"""Summaries over seeds, the printed table, results.json and the learning-curve plot."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

MODELS = {"teacher": "teacher", "student": "student alone", "distilled": "distilled student"}


def spread(values: list[float]) -> dict:
    """mean, sample std (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def fmt_acc(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f} (min–max {s['min']:.4f}–{s['max']:.4f})"


def summarize(seeds: list[dict]) -> dict:
    """``seeds``: one dict per seed with Run objects under teacher / student / distilled / distilled_eager."""
    acc = {k: spread([s[k].final for s in seeds]) for k in (*MODELS, "distilled_eager")}
    # per seed: the median epoch (the first epoch carries warm-up), then the spread over seeds
    timing = {}
    for key, name in (("distilled", "kdkernels"), ("distilled_eager", "eager")):
        timing[name] = {"epoch_s": spread([statistics.median(s[key].epoch_s) for s in seeds]),
                        "loss_s": spread([statistics.median(s[key].loss_s) for s in seeds])}
    return {"test_accuracy": acc, "distill_epoch_time": timing,
            "max_abs_acc_diff_kdkernels_vs_eager": max(
                abs(a - b) for s in seeds for a, b in zip(s["distilled"].test_acc, s["distilled_eager"].test_acc))}


def print_summary(summary: dict, epochs: int, backend_auto: str) -> None:
    acc, t = summary["test_accuracy"], summary["distill_epoch_time"]
    n = acc["teacher"]["n"]
    print(f"\ntest accuracy after {epochs} epochs, mean ± std over {n} seed(s):")
    for key, name in MODELS.items():
        print(f"  {name:<18} {fmt_acc(acc[key])}")
    print(f"  (distilled with the eager losses: {fmt_acc(acc['distilled_eager'])}; largest per-epoch "
          f"difference to the kdkernels run {summary['max_abs_acc_diff_kdkernels_vs_eager']:.4f})")
    k, e = t["kdkernels"], t["eager"]
    print("\ndistillation training, time per epoch (median epoch per seed, mean ± std over seeds; same seeds, "
          "same models):")
    for label, s in ((f'kdkernels losses (backend="auto" -> "{backend_auto}")', k),
                     ('usual eager compositions (bench baselines)', e)):
        print(f"  {label:<42} epoch {1e3 * s['epoch_s']['mean']:6.1f} ± {1e3 * s['epoch_s']['std']:4.1f} ms, "
              f"of which KD losses fwd+bwd {1e3 * s['loss_s']['mean']:6.1f} ± {1e3 * s['loss_s']['std']:4.1f} ms")
    print(f"  kdkernels vs eager: losses {e['loss_s']['mean'] / k['loss_s']['mean']:.2f}x faster, "
          f"whole epoch {e['epoch_s']['mean'] / k['epoch_s']['mean']:.2f}x faster")


def plot(seeds: list[dict], path: Path) -> None:
    """Test accuracy per epoch, mean over seeds with a min–max band; right panel: the second half."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = len(seeds[0]["teacher"].test_acc)
    first = epochs // 2  # index of the first epoch in the zoomed panel
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, lo in zip(axes, (0, first)):
        low = 1.0
        for key, name in MODELS.items():
            curves = list(zip(*(s[key].test_acc for s in seeds)))[lo:]  # per epoch, one value per seed
            x = range(lo + 1, epochs + 1)
            ax.plot(x, [statistics.fmean(c) for c in curves], marker="o", ms=3, label=name)
            ax.fill_between(x, [min(c) for c in curves], [max(c) for c in curves], alpha=0.2)
            low = min(low, *(min(c) for c in curves))
        ax.set(xlabel="epoch", ylabel="test accuracy", ylim=(max(0.0, low - 0.01), 1.0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_title(f"digits, mean over {len(seeds)} seed(s), band = min–max")
    axes[1].set_title(f"epochs {first + 1}–{epochs}")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, meta: dict, summary: dict, seeds: list[dict]) -> None:
    runs = [{"seed": s["seed"], **{k: vars(s[k]) for k in (*MODELS, "distilled_eager")}} for s in seeds]
    path.write_text(json.dumps({**meta, "summary": summary, "runs": runs}, indent=2))
