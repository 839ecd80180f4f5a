"""What the bench prints as it runs: a line per case with the time so far and an ETA, then one line per
(case, implementation) as soon as that one is done (together: the table, as it goes).

The ETA (:class:`Eta`) weighs each case by an a-priori cost (``case_cost``: predicted step time x
steps per implementation, plus a fixed cost per fresh memory process and per ``torch.compile``), and
scales the remaining cases' cost by how long the finished ones actually took per unit of predicted
cost. It is an estimate ("~"), printed so a user knows whether to wait.
"""
from __future__ import annotations

WORKER_S = 3.5  # a fresh memory process: interpreter + torch import, on a loaded 2-core machine
COMPILE_S = 10.0  # torch.compile of one loss on CPU (inductor, C++): 3-10 s cold on 2 cores
IMPL_S = 0.3  # per implementation: building the callable, the GEMM floor, bookkeeping


def _fmt_ms(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def progress_line(r: dict) -> str:
    head = f"  {r['impl']:<12} "
    if r["status"] != "ok":
        return head + r["status"]
    parts = [f"fwd {_fmt_ms(r['fwd_ms'])} ms  bwd {_fmt_ms(r['bwd_ms'])} ms  step {_fmt_ms(r['step_ms'])} ms "
             f"(median of {r['repeats']})"]
    for base in ("eager", "compile", "torchdistill", "liger"):
        v = r.get(f"vs_{base}_step")
        if v is not None and r["impl"] != base:
            parts.append(f"x{v:.2f} vs {base}")
    floors = f"{r['x_copy_floor']:.2f}x copy floor"
    if r.get("x_gemm_floor") is not None:
        floors += f", {r['x_gemm_floor']:.2f}x GEMM floor"
    parts.append(floors)
    if r["tc_frac"] is not None:
        parts.append(f"TC {100 * r['tc_frac']:.1f}%")
    if r["mem_extra_bytes"] is not None:
        parts.append(f"mem +{_fmt_bytes(r['mem_extra_bytes'])} (ratio {r['mem_ratio']:.2f})")
    if r["compile_s"] is not None:
        parts.append(f"compiled in {r['compile_s']:.1f} s")
    return head + " | ".join(parts)


class Eta:
    """Remaining time of a run from a-priori case costs, calibrated on the cases already done."""

    def __init__(self, costs: list[float], time_limit_s: float | None = None):
        self.costs = [max(c, 1e-3) for c in costs]
        self.done = 0
        self.done_cost = 0.0
        self.done_s = 0.0
        self.time_limit_s = time_limit_s

    def finished(self, index: int, seconds: float) -> None:
        """Case ``index`` (0-based, in order) took ``seconds``."""
        self.done = index + 1
        self.done_cost += self.costs[index]
        self.done_s += seconds

    def remaining_s(self, elapsed_s: float) -> float:
        rest = sum(self.costs[self.done:])
        rate = self.done_s / self.done_cost if self.done_cost > 0 else 1.0
        left = rest * rate
        if self.time_limit_s is not None:
            left = min(left, max(0.0, self.time_limit_s - elapsed_s))
        return left

    def case_line(self, i: int, n: int, elapsed_s: float, what: str) -> str:
        eta = f"ETA ~{_fmt_s(self.remaining_s(elapsed_s))}" + ("" if self.done else " (a-priori)")
        return f"[{i}/{n} at {_fmt_s(elapsed_s)}, {eta}] {what}"
