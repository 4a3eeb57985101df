"""Torch work on side threads (RPC workers, the adapter loader) runs on one OpenMP thread.

libgomp gives every thread that starts a parallel region a team of worker threads of its
own. Once the teams hold more threads than the machine has cores, it stops spinning
between parallel regions in every team, and each of the engine's many small ops then pays
a futex wake-up: on a 2-core machine, adapters registered from gRPC worker threads halved
the engine's later base-model throughput (335 -> 175 tok/s, bf16, SmolLM2, B=32). On one
OpenMP thread a side thread's parallel regions run inline and make no team.

Only the calling thread's OpenMP setting changes (`omp_set_num_threads` is per thread);
`torch.set_num_threads` would also change the process-wide default that threads started
later take, such as an engine loop thread that has not stepped yet.
"""

from __future__ import annotations

import ctypes
import threading

import torch

_local = threading.local()
_runtime: list = []  # [the loaded OpenMP library or None], found once


def _openmp_runtime():
    """The OpenMP runtime torch loaded (libgomp, libiomp5 or libomp), or None."""
    if not _runtime:
        library = None
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so") or ".so." in line}
            for path in sorted(paths, key=lambda p: ("/torch/" not in p, p)):  # torch's own first
                if any(name in path.rsplit("/", 1)[-1] for name in ("libgomp", "libiomp5", "libomp")):
                    library = ctypes.CDLL(path)
                    break
        except OSError:  # not Linux: leave the threads as they are
            library = None
        _runtime.append(library)
    return _runtime[0]


def one_thread_off_main() -> None:
    """Limit the calling thread's torch ops to one OpenMP thread, unless it is the main
    thread (which may be the engine's: `serve` steps there). Idempotent per thread."""
    if threading.current_thread() is threading.main_thread() or getattr(_local, "limited", False):
        return
    _local.limited = True
    # torch's lazy per-thread setup first, so that it does not undo the limit later: it runs
    # on a thread's first get_num_threads or parallel region and re-applies the process-wide
    # count once torch.set_num_threads has been called anywhere
    torch.get_num_threads()
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


def set_threads_here(count: int) -> None:
    """Run the calling thread's torch ops, and the project's C kernels (they read the same
    OpenMP setting), on `count` OpenMP threads; other threads and the process-wide default
    are left as they are. MKL follows the thread's OpenMP count unless torch.set_num_threads
    was called in the process (then every thread's MKL keeps that count). Without a known
    OpenMP runtime: torch.set_num_threads (process-wide)."""
    torch.get_num_threads()  # torch's lazy per-thread setup first, as in one_thread_off_main
    runtime = _openmp_runtime()
    if runtime is None:
        torch.set_num_threads(count)
    else:
        runtime.omp_set_num_threads(count)
