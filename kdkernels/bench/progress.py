"""The one progress line printed per (case, implementation) as the bench runs."""
from __future__ import annotations


def _fmt_ms(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def progress_line(r: dict) -> str:
    head = f"  {r['impl']:<8} "
    if r["status"] != "ok":
        return head + r["status"]
    parts = [f"fwd {_fmt_ms(r['fwd_ms'])} ms  bwd {_fmt_ms(r['bwd_ms'])} ms  step {_fmt_ms(r['step_ms'])} ms "
             f"(median of {r['repeats']})"]
    if r["vs_eager_step"] is not None and r["impl"] != "torch":
        parts.append(f"x{r['vs_eager_step']:.2f} eager")
    if r["vs_compile_step"] is not None and r["impl"] not in ("torch", "compile"):
        parts.append(f"x{r['vs_compile_step']:.2f} compile")
    parts.append(f"{r['x_floor']:.2f}x floor")
    if r["tc_frac"] is not None:
        parts.append(f"TC {100 * r['tc_frac']:.1f}%")
    if r["mem_extra_bytes"] is not None:
        parts.append(f"mem +{_fmt_bytes(r['mem_extra_bytes'])} (ratio {r['mem_ratio']:.2f})")
    if r["compile_s"] is not None:
        parts.append(f"compiled in {r['compile_s']:.1f} s")
    return head + " | ".join(parts)
