"""Shared helpers of the benchmark scripts: thread setup, interleaved timing, FLOP counting, a matmul
peak, markdown tables and the JSON record of the run's environment.

Import this module BEFORE torch: it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it,
because on a machine whose cores other processes also use, OpenMP threads that spin-wait at barriers
make torch 10-40x slower (measured on the 2-core dev box). The value used is recorded in the JSON.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from minidiff.files import write_json  # noqa: E402


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (torch's default when None); returns the number in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def time_interleaved(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of ``runs`` calls of every function, taking turns (A, B, C, A, B, C, ...) after ``warmup``
    untimed rounds, so that load changes on a shared machine hit all cases alike."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode counts them (matmuls and convolutions,
    a multiply-add counted as 2), forward and, if ``fn`` runs it, backward."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_case(n: int = 2048) -> tuple[Callable[[], Any], int]:
    """A float32 (n, n) @ (n, n) matmul to time next to the real work, and its FLOP count."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator) for _ in range(2))
    return (lambda: a @ b), 2 * n**3


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats with 3 significant digits (no exponent), None as a dash."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return str(value)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What CPU numbers depend on: versions, threads, the CPU, and the machine's load average now."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu": torch.backends.cpu.get_cpu_capability()}
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    return env


def save_results(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` plus the ``environment`` to ``path`` (JSON, atomically)."""
    write_json(path, {"environment": environment(), **payload})
    print(f"wrote {path}")
