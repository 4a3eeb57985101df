"""How many OpenMP threads the engine's stepping thread uses: a fixed count (`--threads N`),
or (`--threads auto`) every CPU this process may use while nobody else wants them, and
fewer while other processes keep some of them busy.

Why: one engine step is thousands of small parallel regions, each ending at a barrier.
When another busy process shares a core, the team's thread on that core is descheduled
for whole time slices and every region waits for it, so a step slows far more than the
CPU it loses. One thread fewer leaves that core to the other process and no region waits
for a thread that is not running. Measured on a 2-core Xeon (embedded SmolLM2, 24 requests
of 40 tokens): 590 tok/s quiet on 2 threads and 30-90 beside a busy process pinned to one
core; on 1 thread 410 either way. libgomp's OMP_WAIT_POLICY=PASSIVE brought the contended
2 threads to ~390 but cost 8% quiet, so the wait policy is left at libgomp's default.

The estimate, read from /proc before each step and while the engine loop idles (no thread
of its own): over a window of at
least SAMPLE_SECONDS, the busy time of the CPUs in this process's affinity mask, less this
process's own CPU time, is what other processes took, in cores. Niced processes count
like any other: with the kernel's autogroups (a group per session, sched(7)) or cgroups (a
group per service or container) a nice value only ranks a process inside its own group,
so another session's nice-19 build takes its share of a core from the team like a nice-0
one; even in our own session a nice-19 busy process pinned to one core took 0.3-0.45 of it
in some runs here (a fixed 2-thread engine: 590 -> 326 tok/s).
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

AUTO = "auto"
SAMPLE_SECONDS = 0.25  # shortest window an estimate is made over (/proc/stat counts in 10 ms ticks)
# A core counts as taken when other processes use this much more of the machine than the
# cores already given up. A busy process that shares a core with one of the team's threads
# gets only about half of it (the kernel shares a core fairly), so the bar is under 0.5.
TAKE_CORE_AT = 0.35
# A core given up is taken back only when other processes use this much less than the
# cores given up: one busy process on a core it has to itself shows up as ~1.0.
RETURN_CORE_AT = 0.6
RETURN_AFTER_WINDOWS = 2  # windows in a row that must agree before a core is taken back
CHANGE_LOG_SECONDS = 60.0  # at most one log line about a change of the count per this long

# /proc/stat columns after the cpu name: user nice system idle iowait irq softirq steal
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (a hypervisor's other guests)
_IDLE_COLUMNS = (3, 4)  # idle, iowait


def parse_threads(text: str) -> int | None:
    """A `--threads` value: "auto" -> None, else an integer >= 1."""
    if text.strip().lower() == AUTO:
        return None
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return count


class ProcReader:
    """What the monitor reads from the system. Tests pass one that returns synthetic text."""

    def proc_stat(self) -> str:
        return Path("/proc/stat").read_text()

    def self_stat(self) -> str:
        return Path("/proc/self/stat").read_text()

    def affinity(self) -> set[int]:
        return set(os.sched_getaffinity(0))

    def cpu_quota(self) -> float | None:
        return cgroup_cpu_quota()


@dataclass(frozen=True)
class Sample:
    cpus: frozenset[int]  # the CPUs summed over
    busy: int  # ticks those CPUs spent busy (any process, the kernel, a hypervisor's other guests)
    total: int  # all ticks of those CPUs (busy and idle)
    own: int  # this process's user + system ticks (on any CPU of the set: its affinity)


def read_sample(reader: ProcReader) -> Sample:
    cpus = frozenset(reader.affinity())
    busy = total = 0
    for line in reader.proc_stat().splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(value) for value in rest.split()[:8]]
        ticks += [0] * (8 - len(ticks))  # old kernels lack steal
        busy += sum(ticks[i] for i in _BUSY_COLUMNS)
        total += sum(ticks[i] for i in (*_BUSY_COLUMNS, *_IDLE_COLUMNS))
    # /proc/self/stat: "pid (comm) state ..."; comm may hold spaces, so split after its ')'
    fields = reader.self_stat().rpartition(")")[2].split()
    own = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return Sample(cpus, busy, total, own)


def others_busy_cores(before: Sample, after: Sample) -> float | None:
    """Cores other processes kept busy between two samples; None if the CPU set changed
    or no tick passed."""
    if before.cpus != after.cpus or after.total <= before.total:
        return None
    elapsed_per_cpu = (after.total - before.total) / len(after.cpus)
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others / elapsed_per_cpu)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 `cpu.max`, v1 `cpu.cfs_quota_us`),
    the tightest along its path up to the root; None when there is none."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            files = [(root / folder / "cpu.max", None) for folder in _path_and_parents(path)]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            mount = root / controllers
            if not mount.exists():
                mount = root / "cpu"
            files = [(mount / folder / "cpu.cfs_quota_us", mount / folder / "cpu.cfs_period_us")
                     for folder in _path_and_parents(path)]
        else:
            continue
        for quota_file, period_file in files:
            try:
                if period_file is None:
                    quota, period = quota_file.read_text().split()
                else:
                    quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            except (OSError, ValueError):
                continue
            if quota not in ("max", "-1") and int(period) > 0:
                quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _path_and_parents(path: str) -> list[str]:
    """"/a/b" -> ["a/b", "a", ""] (relative to the hierarchy's mount; inside a container the
    path may not exist there, and the root then holds the container's own limit)."""
    parts = [part for part in path.strip("/").split("/") if part]
    return ["/".join(parts[:end]) for end in range(len(parts), -1, -1)]


def usable_cpus(affinity: int, quota: float | None) -> int:
    """CPUs worth a thread: the affinity mask, cut to a cgroup quota rounded down (a thread
    beyond the quota is throttled in the middle of regions, and the team waits for it)."""
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.floor(quota + 1e-9)))


class ContentionMonitor:
    """Samples /proc when asked (`poll`, at most every SAMPLE_SECONDS) and answers the thread
    count the stepping thread should use: usable CPUs less the cores other processes take,
    at least one. Hysteresis: a core is given up at once (a contended window costs far more
    than one thread fewer), and taken back only after RETURN_AFTER_WINDOWS calm windows."""

    def __init__(self, reader: ProcReader | None = None, clock: Callable[[], float] = time.monotonic):
        self.reader, self.clock = reader or ProcReader(), clock
        self.cores = self._usable()
        self.given_up = 0  # cores left to other processes
        self.others: float | None = None  # the last window's estimate, in cores
        self._calm_windows = 0
        self._last = read_sample(self.reader)
        self._last_time = clock()

    @property
    def threads(self) -> int:
        return max(1, self.cores - self.given_up)

    def _usable(self) -> int:
        return usable_cpus(len(self.reader.affinity()), self.reader.cpu_quota())

    def poll(self) -> int:
        """The thread count for the next steps (a new estimate once the window is long enough)."""
        now = self.clock()
        if now - self._last_time < SAMPLE_SECONDS:
            return self.threads
        sample = read_sample(self.reader)
        others = others_busy_cores(self._last, sample)
        self._last, self._last_time = sample, now
        self.cores = self._usable()
        if others is not None:
            self.others = others
            self._decide(others)
        self.given_up = min(self.given_up, self.cores - 1)
        return self.threads

    def _decide(self, others: float) -> None:
        # cores other processes take, counted generously (TAKE_CORE_AT) or strictly (RETURN_CORE_AT)
        taken_generously = math.floor(others + 1 - TAKE_CORE_AT)
        taken_strictly = math.floor(others + RETURN_CORE_AT)
        if taken_generously > self.given_up:
            self.given_up = min(taken_generously, self.cores - 1)
            self._calm_windows = 0
        elif taken_strictly < self.given_up:
            self._calm_windows += 1
            if self._calm_windows >= RETURN_AFTER_WINDOWS:
                self.given_up = max(taken_strictly, 0)
                self._calm_windows = 0
        else:
            self._calm_windows = 0


class EngineThreads:
    """Sets the OpenMP thread count of whichever thread steps the engine: `threads` fixed,
    or None for auto (a ContentionMonitor decides). `tune` runs before every step, and
    while the engine loop idles, so that the estimate a burst of work starts from covers
    the last moments, not the whole idle time."""

    def __init__(self, threads: int | None, log: Callable[[str], None] = lambda line: None,
                 monitor_factory: Callable[[], ContentionMonitor] = ContentionMonitor,
                 apply: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.fixed = threads
        self.log, self._clock = log, clock
        self._last_logged = -math.inf
        self._unlogged_changes = 0  # changes since the last line (on a busy shared machine they come often)
        self.monitor = monitor_factory() if threads is None else None
        self._apply = apply or _set_torch_threads
        self.current: int | None = None  # the count last set; None before the first step
        self._thread: int | None = None  # the ident of the thread it was set on
        log(f"engine threads: {threads} (fixed)" if threads is not None else
            f"engine threads: auto ({self.monitor.cores} usable CPUs; fewer while other processes keep some busy)")

    @property
    def count(self) -> int:
        """The count the stepping thread uses (or will use at its first step)."""
        if self.current is not None:
            return self.current
        return self.fixed if self.monitor is None else self.monitor.threads

    @property
    def others_busy_cores(self) -> float | None:
        return None if self.monitor is None else self.monitor.others

    def tune(self) -> None:
        """Poll the monitor (auto) and set the count on the calling thread if it changed."""
        wanted = self.fixed if self.monitor is None else self.monitor.poll()
        thread = threading.get_ident()
        if wanted == self.current and thread == self._thread:
            return
        self._apply(wanted)  # per thread: a new stepping thread gets it too
        if self.current is not None and wanted != self.current:  # only auto changes it
            self._log_change(self.current, wanted)
        self.current, self._thread = wanted, thread

    def _log_change(self, before: int, after: int) -> None:
        self._unlogged_changes += 1
        now = self._clock()
        if now - self._last_logged < CHANGE_LOG_SECONDS:
            return
        since = (f" ({self._unlogged_changes} changes since the last such line)"
                 if self._unlogged_changes > 1 else "")
        self.log(f"engine threads {before} -> {after}: other processes keep {self.monitor.others:.1f} of "
                 f"{self.monitor.cores} usable CPUs busy{since}")
        self._last_logged, self._unlogged_changes = now, 0


def _set_torch_threads(count: int) -> None:
    from loraquilt.server.torch_threads import set_threads_here  # torch is imported on first use only

    set_threads_here(count)
