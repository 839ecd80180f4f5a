"""Results out: the final text table, JSON, CSV and PNG plots (matplotlib, Agg backend).

Files written under the output directory (at most four: a lent GPU machine brings few back):
``results.json`` (meta, every row, and the printed report as text), ``results.csv`` (the rows),
``speedup.png`` (speed-up vs the eager composition per loss / implementation / phase) and, when the preset has a
sweep, ``scaling.png`` (step time and extra memory against B for the relation losses). JSON and
CSV are rewritten after every case, so a run cut short still leaves its numbers.
"""
from __future__ import annotations

import csv
import json
import math
import os

from kdkernels.bench.cases import SPECS
from kdkernels.bench.impls import LABELS
from kdkernels.bench.peers import NOTES
from kdkernels.bench.rows import ROW_FIELDS

PHASES = ("fwd", "bwd", "step")


# -------------------------------------------------------------------------------- formatting
def _num(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}"


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _status(r: dict) -> str:
    s = r["status"]
    return s if len(s) <= 48 else s[:45] + "..."


def text_table(header: list[str], body: list[list[str]], optional: tuple[str, ...] = ()) -> str:
    """Columns aligned; the ``optional`` columns are left out when every cell is "-"."""
    keep = [i for i, h in enumerate(header) if h not in optional or any(row[i] != "-" for row in body)]
    header = [header[i] for i in keep]
    body = [[row[i] for i in keep] for row in body]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    right = [i for i, h in enumerate(header) if h not in ("loss", "case", "impl", "status")]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in body]
    return "\n".join(lines)


MAIN_OPTIONAL = ("x torchdistill", "x liger", "x twopass", "x dense", "x linear_kd", "x GEMM floor", "TC %", "extra MiB",
                 "mem ratio", "mem>grads x eager")


def main_table(rows: list[dict]) -> str:
    header = ["loss", "case", "impl", "status", "fwd ms", "bwd ms", "step ms", "x eager f/b/step",
              "x compile step", "x torchdistill", "x liger", "x twopass", "x dense", "x linear_kd", "x copy floor",
              "x GEMM floor", "GB/s", "TC %", "extra MiB", "mem ratio", "mem>grads x eager"]
    body = []
    for r in rows:
        if r["group"] != "main":
            continue
        ok = r["status"] == "ok"
        eager = "/".join(_x(r[f"vs_eager_{p}"]) for p in PHASES) if ok and r["vs_eager_step"] is not None else "-"
        body.append([r["loss"], r["case"], r["impl"], _status(r), _ms(r["fwd_ms"]), _ms(r["bwd_ms"]),
                     _ms(r["step_ms"]), eager, _x(r["vs_compile_step"]), _x(r["vs_torchdistill_step"]),
                     _x(r["vs_liger_step"]), _x(r["vs_twopass_step"]), _x(r["vs_dense_step"]),
                     _x(r.get("vs_linear_kd_step")), _x(r["x_copy_floor"]),
                     _x(r["x_gemm_floor"]), _num(r["achieved_GBps"], 1), _num(None if r["tc_frac"] is None else 100 * r["tc_frac"], 1),
                     _mib(r["mem_extra_bytes"]), _x(r["mem_ratio"]), _num(r.get("mem_beyond_grads_x_eager"), 3)])
    return text_table(header, body, MAIN_OPTIONAL)


def scaling_rows(rows: list[dict]) -> list[dict]:
    """The sweep points, plus the main cases that are points of the same sweep (same loss, D, dtype)."""
    sweeps = {(r["loss"], _sweep_key(r)) for r in rows if r["group"] == "scaling"}
    impls = {(r["loss"], _sweep_key(r), r["impl"]) for r in rows if r["group"] == "scaling"}
    picked = [r for r in rows if (r["loss"], _sweep_key(r), r["impl"]) in impls]
    dim = {r["loss"]: SPECS[r["loss"]].scale_dim for r in picked}
    return sorted(picked, key=lambda r: (r["loss"], _sweep_key(r), r["dims"].get(dim[r["loss"]]) or 0))


def _sweep_key(r: dict) -> str:
    sd = SPECS[r["loss"]].scale_dim
    return json.dumps([{k: v for k, v in r["dims"].items() if k != sd}, r["dtype"], r["options"]], sort_keys=True)


def scaling_table(rows: list[dict]) -> str:
    header = ["loss", "case", "impl", "status", "step ms", "x eager step", "x copy floor", "x GEMM floor", "TC %",
              "extra MiB", "mem ratio"]
    body = []
    for r in scaling_rows(rows):
        body.append([r["loss"], r["case"], r["impl"], _status(r), _ms(r["step_ms"]), _x(r["vs_eager_step"]),
                     _x(r["x_copy_floor"]), _x(r["x_gemm_floor"]),
                     _num(None if r["tc_frac"] is None else 100 * r["tc_frac"], 1),
                     _mib(r["mem_extra_bytes"]), _x(r["mem_ratio"])])
    return text_table(header, body, ("x GEMM floor", "TC %", "extra MiB", "mem ratio"))


LEGEND = [
    "ratios: x <baseline> = time(baseline) / time(impl), same run (> 1: impl is faster); baselines:",
    "  eager        = " + LABELS["eager"] + ": F.kl_div(log_softmax, log_softmax, log_target=True) * T^2 for KD, "
    "F.linear / 1x1 F.conv2d + F.mse_loss, Gram-trick RKD, the SP paper's",
    "  compile      = " + LABELS["compile"],
    "  torchdistill = torchdistill's KDLoss / RKDLoss / SPKDLoss / SimpleLossWrapper(nn.MSELoss) (see notes)",
    "  twopass      = " + LABELS["twopass"] + ": x twopass is the one-pass step's gain",
    "  dense        = " + LABELS["dense"] + " (softmax_kl_div_topk cases)",
    "  linear_kd    = " + LABELS["linear_kd"] + " (fused_linear_softmax_kl_div cases)",
    "  liger        = Liger-Kernel's KL / JSD on log-softmaxes, LigerFusedLinearJSD for the fused head (GPU)",
    "  reference    = kdkernels.reference, the accuracy spec: shown, never a ratio's baseline",
    "x copy floor = step time / (bytes that must move / copy bandwidth); x GEMM floor = step time / time of "
    "plain torch.mm over the step's GEMM FLOPs (GEMM-bound losses); mem ratio = (inputs + extra) / (inputs + gradients); "
    "mem>grads x eager = (extra - gradients) / the eager composition's (extra - gradients)",
]


def full_report(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    bw = meta.get("copy_bandwidth", {})
    out = [f"kdkernels bench -- preset {meta['preset']['name']} on {meta['device_name']}, torch {meta['torch']}, "
           f"{meta['threads']} thread(s), commit {meta.get('kdkernels_commit')}, "
           f"torchdistill {meta.get('torchdistill') or 'not installed'}",
           f"copy bandwidth {bw.get('GBps', float('nan')):.1f} GB/s", *LEGEND, "", main_table(rows)]
    if any(r["group"] == "scaling" for r in rows):
        out += ["", "scaling:", scaling_table(rows)]
    checked = [r for r in rows if r.get("targets")]
    if checked:
        out += ["", "targets:"] + [f"  {r['loss']} {r['case']} [{r['impl']}]: {r['targets']}" for r in checked]
    notes = [f"  {impl} / {loss}: {NOTES[(impl, loss)]}" for impl, loss in
             dict.fromkeys((r["impl"], r["loss"]) for r in rows) if (impl, loss) in NOTES]
    if notes:
        out += ["", "notes:"] + notes
    return "\n".join(out)


# -------------------------------------------------------------------------------------- files
def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(r[k], sort_keys=True) if isinstance(r.get(k), dict) else r.get(k)
                        for k in ROW_FIELDS})


def _plt():
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", message="Tight layout not applied", category=UserWarning)
    import matplotlib.pyplot as plt

    return plt


def _times_formatter(minor: bool = False):
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _pos):
        if v <= 0:
            return ""
        if minor:  # label only 2x, 5x, 0.2x, 0.5x ... between the decades
            lead = v / 10 ** math.floor(math.log10(v) + 1e-9)
            if round(lead) not in (2, 5) or abs(lead - round(lead)) > 1e-6:
                return ""
        return f"{v:g}x"

    return FuncFormatter(fmt)


def plot_speedup(rows: list[dict], path: str, title: str = "") -> None:
    plt = _plt()
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["group"] == "main" and r["status"] == "ok" and r["impl"] != "eager" and r["vs_eager_step"] is not None:
            groups.setdefault((r["loss"], r["case"]), []).append(r)
    n = max(1, len(groups))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(6.5, 5.2 * cols), 3.6 * nrows + 0.6), squeeze=False)
    colors = {"fwd": "#4C72B0", "bwd": "#DD8452", "step": "#55A868"}
    for ax, ((loss, case), rs) in zip(axes.flat, groups.items()):
        x = range(len(rs))
        width = 0.27
        for k, ph in enumerate(PHASES):
            vals = [r[f"vs_eager_{ph}"] for r in rs]
            # bars grow up (faster) or down (slower) from 1x on a log axis
            bars = ax.bar([i + (k - 1) * width for i in x], [v - 1 for v in vals], width, bottom=1.0, label=ph,
                          color=colors[ph])
            if ph == "step":
                for b, v in zip(bars, vals):
                    ax.annotate(f"{v:.3g}x", (b.get_x() + b.get_width() / 2, v), ha="center",
                                va="bottom" if v >= 1 else "top", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        lo = min(min(r[f"vs_eager_{p}"] for p in PHASES) for r in rs)
        hi = max(max(r[f"vs_eager_{p}"] for p in PHASES) for r in rs)
        ax.set_ylim(min(lo, 1.0) / 1.6, max(hi, 1.0) * 1.6)
        ax.yaxis.set_major_formatter(_times_formatter())
        ax.yaxis.set_minor_formatter(_times_formatter(minor=True))
        ax.set_xticks(list(x))
        ax.set_xticklabels([r["impl"] + ("\n(accuracy spec)" if r["impl"] == "reference" else "") for r in rs])
        ax.set_title(f"{loss}\n{case}", fontsize=9)
        ax.set_ylabel("speed-up vs eager composition (x)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if not groups:
        axes.flat[0].text(0.5, 0.5, "no speed-ups to plot\n(no implementation ran next to the eager composition)",
                          ha="center", va="center")
    fig.suptitle(title or "speed-up vs the eager composition, same run", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: list[dict], path: str, title: str = "") -> bool:
    pts = scaling_rows(rows)
    sweeps: dict[tuple, list[dict]] = {}
    for r in pts:
        sweeps.setdefault((r["loss"], _sweep_key(r)), []).append(r)
    if not sweeps:
        return False
    plt = _plt()
    fig, axes = plt.subplots(2, len(sweeps), figsize=(max(6, 5 * len(sweeps)), 7.5), squeeze=False)
    for j, ((loss, _key), rs) in enumerate(sweeps.items()):
        sd = SPECS[loss].scale_dim
        impls = list(dict.fromkeys(r["impl"] for r in rs))
        sizes = [r["dims"][sd] for r in rs]
        for impl in impls:
            ok = [r for r in rs if r["impl"] == impl and r["status"] == "ok"]
            line = None
            if ok:
                (line,) = axes[0, j].plot([r["dims"][sd] for r in ok], [r["step_ms"] for r in ok], "o-", label=impl)
            okm = [r for r in rs if r["impl"] == impl and r["mem_extra_bytes"] is not None]
            if okm:
                axes[1, j].plot([r["dims"][sd] for r in okm],
                                [max(r["mem_extra_bytes"], 1024) / 2**20 for r in okm], "o-", label=impl,
                                color=None if line is None else line.get_color())
            # points that did not run: a cross at the top of the time axis
            for r in rs:
                if r["impl"] == impl and r["status"].startswith(("skipped", "OOM", "error", "timeout")):
                    axes[0, j].plot([r["dims"][sd]], [0.97], "x", color="grey" if line is None else line.get_color(),
                                    transform=axes[0, j].get_xaxis_transform(), clip_on=False)
        notes: dict[int, list[str]] = {}  # ... and the reasons, one note per size
        for r in rs:  # only what depends on the size (not "not implemented", "unavailable")
            if r["status"].startswith(("skipped", "OOM", "error", "timeout")):
                notes.setdefault(r["dims"][sd], []).append(f"{r['impl']}: {r['status'].split(' (')[0]}")
        for b, lines in notes.items():
            axes[0, j].annotate("\n".join(lines), (b, 0.93), xycoords=axes[0, j].get_xaxis_transform(),
                                fontsize=6, ha="right", va="top", rotation=90)
        rest = rs[0]["case"].split(" ", 1)[1] if " " in rs[0]["case"] else ""
        axes[0, j].set_title(f"{loss} ({rest})", fontsize=9)
        for i, lab in ((0, "step time (ms)"), (1, "extra memory (MiB)")):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
            ax.set_yscale("log")
            ax.set_xlabel(sd)
            ax.set_ylabel(lab)
            ax.grid(True, which="both", lw=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(title or "scaling over the batch", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


FILES = {"json": "results.json", "csv": "results.csv", "png": "speedup.png", "scaling_png": "scaling.png"}


def write_data(result: dict, out_dir: str) -> dict:
    """The numbers only (JSON with the printed report inside, CSV): cheap, written after every case."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, FILES[k]) for k in ("json", "csv")}
    write_json({**result, "report": full_report(result)}, paths["json"])
    write_csv(result["rows"], paths["csv"])
    return paths


def write_all(result: dict, out_dir: str) -> dict:
    """Every output file; returns {kind: path}. Four files at most (a device run brings back few)."""
    paths = write_data(result, out_dir)
    meta = result["meta"]
    name = meta["preset"]["name"]
    try:
        png = os.path.join(out_dir, FILES["png"])
        plot_speedup(result["rows"], png, f"speed-up vs the eager composition (the usual PyTorch code), same run\n"
                                          f"preset {name}, {meta['device_name']}")
        paths["png"] = png
        scaling = os.path.join(out_dir, FILES["scaling_png"])
        if plot_scaling(result["rows"], scaling, f"scaling\npreset {name}, {meta['device_name']}"):
            paths["scaling_png"] = scaling
    except ImportError as e:  # matplotlib is in the "bench" extra: the numbers are written anyway
        print(f"kdkernels bench: no plots ({e})", flush=True)
    return paths
