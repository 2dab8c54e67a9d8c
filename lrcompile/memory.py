"""Peak resident memory per phase of a compile.

Linux keeps each process's peak resident set size (``VmHWM`` in ``/proc/self/status``, file-backed
pages of mapped weights included) and lets a process reset it to the current size by writing ``5``
to ``/proc/self/clear_refs`` (Linux 4.0 and later). :class:`PhasePeaks` reads the peak at the end of
each phase and resets it for the next, so each phase gets the peak reached while it ran. Worker
processes (``resource.RUSAGE_CHILDREN``) keep one peak that cannot be reset: the largest resident
set of any finished child; a phase records it when it grew during the phase, else None. Where
``/proc`` is missing or read-only the process peak is the one since the start
(``resource.RUSAGE_SELF``), so a phase's figure is then an upper bound; where nothing is
readable the figure is None.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

MB = 1 << 20


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_bytes(who: str) -> int | None:
    """``getrusage(resource.<who>).ru_maxrss`` in bytes; None where there is no ``resource``."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    v = resource.getrusage(getattr(resource, who)).ru_maxrss
    return v if sys.platform == "darwin" else v * 1024  # bytes on macOS, KiB elsewhere


def peak_rss() -> int | None:
    """This process's peak resident set size in bytes since the last :func:`reset_peak` (or its start)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else _ru_maxrss_bytes("RUSAGE_SELF")


def current_rss() -> int | None:
    """This process's resident set size in bytes now (None where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def reset_peak() -> bool:
    """Reset the peak to the current resident set size; False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def children_peak() -> int | None:
    """The largest peak resident set size of any finished child process, in bytes (0: none yet)."""
    return _ru_maxrss_bytes("RUSAGE_CHILDREN")


def _mb(b: int | None) -> float | None:
    return None if b is None else round(b / MB, 1)


@dataclass
class PhasePeaks:
    """Each phase's peak resident memory: call :meth:`mark` at the end of each phase."""

    phases: dict[str, dict] = field(default_factory=dict)
    resettable: bool = True
    _children: int | None = None

    def __post_init__(self) -> None:
        self.resettable = reset_peak()
        self._children = children_peak()

    def mark(self, name: str) -> None:
        """Record the peak since the previous mark as phase ``name``'s (the larger, when a phase
        is marked again), then reset it."""
        own, kids = peak_rss(), children_peak()
        grew = kids if kids is not None and self._children is not None and kids > self._children else None
        self._children = kids
        new = {"rss_peak_mb": _mb(own), "children_rss_peak_mb": _mb(grew)}
        old = self.phases.get(name)
        if old is not None:
            new = {k: max((v for v in (old[k], new[k]) if v is not None), default=None) for k in new}
        self.phases[name] = new
        self.resettable = reset_peak() and self.resettable

    def to_dict(self, bounds: dict[str, str]) -> dict:
        """The report's ``memory`` section: per phase its peaks, and what each phase holds."""
        return {"phases": dict(self.phases), "peak_resettable": self.resettable,
                "bounds": {k: v for k, v in bounds.items() if k in self.phases}}


__all__ = ["MB", "PhasePeaks", "children_peak", "current_rss", "peak_rss", "reset_peak"]
