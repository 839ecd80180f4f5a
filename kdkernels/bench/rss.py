"""This process's resident memory (RSS) and its peak, in bytes: the one place that reads them.

Linux keeps the peak RSS as ``VmHWM`` in ``/proc/self/status``; writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0) resets it to the current RSS, so the extra memory of one
step is ``peak_bytes()`` after the step minus ``rss_bytes()`` before it, once ``reset_peak()``
returned True (``peak_extra_bytes`` does exactly that). Where the mark cannot be reset, :class:`PeakPoller` samples the RSS instead.

Used by the bench's memory worker, the stand-alone scripts in ``benchmarks/`` and the memory tests.
"""
from __future__ import annotations

import re
import threading
import time
from typing import Callable

# reset_peak() accepts a peak this far above the RSS read just after it (pages touched in between)
_RESET_SLACK_BYTES = 4 << 20


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``VmSize``), in bytes; None if unreadable."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def rss_bytes() -> int:
    """The resident set size now (``VmRSS``; psutil where there is no /proc)."""
    v = _status_bytes("VmRSS")
    if v is not None:
        return v
    import psutil

    return psutil.Process().memory_info().rss


def peak_bytes() -> int | None:
    """The peak resident set size since the process started or since the last :func:`reset_peak` (``VmHWM``)."""
    return _status_bytes("VmHWM")


def virtual_bytes() -> int | None:
    """The size of the address space now (``VmSize``)."""
    return _status_bytes("VmSize")


def reset_peak(check: bool = False) -> bool:
    """Reset the peak-RSS mark to the current RSS. False if ``/proc/self/clear_refs`` is not
    writable, or, with ``check``, if the mark does not read about the RSS right after the write
    (a kernel that accepts the write but keeps the mark)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    if not check:
        return True
    hwm, rss = peak_bytes(), _status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + _RESET_SLACK_BYTES


class PeakPoller:
    """Fallback when the peak mark cannot be reset: polls the RSS every millisecond inside ``with``;
    ``peak_bytes`` is the highest RSS seen."""

    def __init__(self):
        self.peak_bytes = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())


def peak_extra_bytes(step: Callable[[], object]) -> int | None:
    """How far the RSS peaked during ``step()`` above the RSS just before it; None where the peak
    mark cannot be reset (no ``/proc/self/clear_refs``)."""
    if not reset_peak():
        return None
    before = rss_bytes()
    step()
    return peak_bytes() - before
