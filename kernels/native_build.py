"""Building and loading the project's C kernels (every family's `*.c` beside its binding).

Each source is compiled at first use with the system C compiler (AVX2/FMA, `-O3`) into
the cache (`$LORAQUILT_CACHE` or `~/.cache/loraquilt`, under `kernels/`, keyed by the
source, the flags and the compiler), then loaded with ctypes. It links the OpenMP runtime
by the soname torch has already loaded (libgomp.so.1), so the process never maps a second
one; where torch uses another runtime the kernel is built without OpenMP (one thread).

`build_native_library` returns None (after one warning line from its caller's `warn`)
when the CPU lacks AVX2/FMA, no compiler is found, the build fails, or
`LORAQUILT_NATIVE_KERNELS=0`; every caller then keeps a torch or bitsandbytes path.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from loraquilt.kernels.host import cache_root, cpu_flags

NATIVE_ENV = "LORAQUILT_NATIVE_KERNELS"
REQUIRED_FLAGS = ("avx2", "fma")
BASE_FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-std=c11")


def loaded_openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (from /proc/self/maps)."""
    names = ("libgomp", "libiomp", "libomp")
    found: list[str] = []
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1] if line.split() else ""
            if any(Path(path).name.startswith(name) for name in names) and path not in found:
                found.append(path)
    except OSError:
        pass
    return found


def _torch_uses_gomp() -> bool:
    import torch  # noqa: F401  (loads torch's OpenMP runtime first)

    runtimes = loaded_openmp_runtimes()
    return bool(runtimes) and all(Path(path).name.startswith("libgomp") for path in runtimes)


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def build_native_library(source: Path, stem: str,
                         warn: Callable[[str], None]) -> tuple[ctypes.CDLL, Path, bool] | None:
    """Compile one of the project's C sources (AVX2/FMA, OpenMP when torch uses libgomp)
    into the cache once and load it: (library, path, openmp), or None after one `warn`
    line when `LORAQUILT_NATIVE_KERNELS=0`, the CPU or platform cannot run it, no compiler
    is found or the build fails."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        warn(f"no native kernel for {platform.system()} {platform.machine()}")
        return None
    missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]
    if missing:
        warn(f"the CPU lacks {', '.join(missing)}")
        return None
    compiler = _compiler()
    if compiler is None:
        warn("no C compiler (cc, gcc or clang) on PATH")
        return None
    openmp = _torch_uses_gomp()
    flags = [*BASE_FLAGS, *(("-fopenmp",) if openmp else ())]
    try:
        path = _build(compiler, flags, source, stem)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        warn(f"building {source.name} failed ({str(error).strip().splitlines()[-1][:200]})")
        return None
    return library, path, openmp


def load_native(source: Path, stem: str, instead: str,
                signatures: dict[str, tuple[list, object]]) -> tuple[ctypes.CDLL, Path, bool] | None:
    """`build_native_library` for a kernel family's native module: the warning line ends
    with what runs instead (`instead`), and each function named in `signatures` gets its
    (argument types, return type). (library, path, openmp), or None."""
    def warn(message: str) -> None:
        print(f"loraquilt: warning: {message}; {instead}", file=sys.stderr, flush=True)

    built = build_native_library(source, stem, warn)
    if built is None:
        return None
    for name, (argtypes, restype) in signatures.items():
        function = getattr(built[0], name)
        function.argtypes, function.restype = argtypes, restype
    return built


def _build(compiler: str, flags: list[str], source: Path, stem: str) -> Path:
    """Compile into the cache once (a lock serializes processes building at the same time)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    folder = cache_root() / "kernels" / f"{stem}-{key}"
    target = folder / f"libloraquilt_{stem}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise subprocess.SubprocessError(result.stderr or f"{compiler} exited {result.returncode}")
            os.replace(built, target)
    return target
