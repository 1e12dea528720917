"""How many CPU threads torch gets: ``threads=auto`` (default) takes the affinity cores minus
the one-minute load average, at least one, since torch's one thread per core oversubscribes
a shared machine (docs/performance.md, "Threads on a shared machine"); an integer sets the
count, ``null`` keeps torch's default. Every CLI takes ``--threads`` with the same values.
"""

from __future__ import annotations

import argparse
import os

import torch

__all__ = ["THREADS_HELP", "add_device_threads_arguments", "apply_threads", "auto_threads",
           "available_cores", "parse_threads"]

THREADS_HELP = ("torch CPU threads: auto (default: the free cores of this machine), "
                "an integer, or 'default' (torch's own choice)")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform (Windows)
        return 0.0


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """``round(cores - load)`` within ``[1, cores]`` (defaults: :func:`available_cores`, the
    one-minute load average)."""
    cores = available_cores() if cores is None else cores
    load = _load_average() if load is None else load
    return max(1, min(cores, round(cores - load)))


def parse_threads(value: int | str | None) -> int | str | None:
    """A ``threads`` setting: ``"auto"``, an integer >= 1 or ``None``/``"default"``."""
    if value is None or value == "default":
        return None
    if value == "auto":
        return "auto"
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if isinstance(value, bool) or count < 1 or str(count) != str(value).strip():
        raise ValueError(f"threads={value!r} is invalid: expected auto, an integer >= 1, "
                         "or null/default (torch's default)")
    return count


def apply_threads(value: int | str | None) -> tuple[int, str]:
    """Set torch's intra-op threads; returns the count and how it was chosen."""
    setting = parse_threads(value)
    if setting is None:
        return torch.get_num_threads(), "torch's default"
    if setting == "auto":
        cores, load = available_cores(), _load_average()
        count = auto_threads(cores, load)
        how = f"auto: {cores} cores, load {load:.1f}"
    else:
        count, how = setting, "set"
    torch.set_num_threads(count)
    return count, how


def _threads_argument(text: str) -> int | str | None:
    try:
        return parse_threads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_device_threads_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (:data:`THREADS_HELP`) and ``--device cpu|cuda`` for a CLI."""
    parser.add_argument("--threads", type=_threads_argument, default="auto", help=THREADS_HELP)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the networks run (default cpu)")
