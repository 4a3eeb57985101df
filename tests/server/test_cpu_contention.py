"""The engine thread count (--threads N|auto): /proc arithmetic, the auto mode's decisions
and hysteresis on synthetic /proc samples, cgroup quotas, flag parsing, and the count
really set on the stepping thread."""

from __future__ import annotations

import argparse
import threading

import pytest
import torch

from loraquilt.server.cpu_contention import (
    CHANGE_LOG_SECONDS, RETURN_AFTER_WINDOWS, SAMPLE_SECONDS, ContentionMonitor, EngineThreads, ProcReader, Sample,
    cgroup_cpu_quota, others_busy_cores, parse_threads, read_sample, usable_cpus,
)
from loraquilt.server.engine import EngineConfig

HZ = 100  # /proc/stat's USER_HZ


class FakeProc(ProcReader):
    """A machine whose /proc text the test writes: `run` advances the clock and spreads the
    given busy cores (this process's, other processes', niced ones) over the CPUs."""

    def __init__(self, cpus: int = 2, affinity: set[int] | None = None, quota: float | None = None, nice: int = 0):
        self.ticks = {cpu: [0] * 8 for cpu in range(cpus)}  # user nice system idle iowait irq softirq steal
        self.own_ticks = 0
        self.cpu_set = set(range(cpus)) if affinity is None else affinity
        self.quota, self.nice, self.now = quota, nice, 1000.0
        self.reads = 0

    def run(self, seconds: float, own: float = 0.0, others: float = 0.0, niced: float = 0.0,
            cpus: set[int] | None = None) -> None:
        """`seconds` pass; `own`, `others` and `niced` are cores kept busy, spread evenly over
        `cpus` (default: the affinity mask)."""
        cpus = sorted(self.cpu_set if cpus is None else cpus)
        per_cpu = round(seconds * HZ)
        for cpu in cpus:
            share = lambda cores: round(cores * seconds * HZ / len(cpus))  # noqa: E731
            own_ticks, other_ticks, niced_ticks = share(own), share(others), share(niced)
            column = 1 if self.nice > 0 else 0  # a niced process's own time lands in `nice`
            self.ticks[cpu][column] += own_ticks
            self.ticks[cpu][0] += other_ticks * 3 // 4
            self.ticks[cpu][2] += other_ticks - other_ticks * 3 // 4  # some of it as system time
            self.ticks[cpu][1] += niced_ticks
            self.ticks[cpu][3] += per_cpu - own_ticks - other_ticks - niced_ticks
            self.own_ticks += own_ticks
        for cpu in set(self.ticks) - set(cpus):
            self.ticks[cpu][3] += per_cpu
        self.now += seconds

    def clock(self) -> float:
        return self.now

    def proc_stat(self) -> str:
        self.reads += 1
        total = [sum(column) for column in zip(*self.ticks.values())]
        lines = ["cpu  " + " ".join(map(str, total + [0, 0]))]
        lines += [f"cpu{cpu} " + " ".join(map(str, ticks + [0, 0])) for cpu, ticks in self.ticks.items()]
        return "\n".join(lines + ["intr 1 2 3", "ctxt 99", "procs_running 3"]) + "\n"

    def self_stat(self) -> str:
        utime, stime = self.own_ticks * 2 // 3, self.own_ticks - self.own_ticks * 2 // 3
        fields = ["S", "1", "1", "1", "0", "-1", "4194560", "10", "0", "0", "0", str(utime), str(stime)]
        return "4242 (python (a) b) " + " ".join(fields + ["0"] * 30) + "\n"

    def affinity(self) -> set[int]:
        return set(self.cpu_set)

    def cpu_quota(self) -> float | None:
        return self.quota


def monitor_on(proc: FakeProc) -> ContentionMonitor:
    return ContentionMonitor(proc, clock=proc.clock)


# -- arithmetic -------------------------------------------------------------------------------


def test_a_sample_sums_the_affinity_cpus_and_reads_the_process_times_after_its_name():
    proc = FakeProc(cpus=4, affinity={1, 2})
    proc.run(1.0, own=1.5, others=0.5, cpus={1, 2})
    sample = read_sample(proc)
    assert sample.cpus == {1, 2}
    assert sample.total == 2 * HZ
    assert sample.busy == 2 * HZ  # both CPUs of the mask were busy the whole second
    assert sample.own == 150  # utime + stime, though the process name holds ") " and spaces


def test_other_processes_busy_cores_is_busy_time_less_our_own_per_elapsed_cpu_time():
    proc = FakeProc(cpus=2)
    before = read_sample(proc)
    proc.run(2.0, own=1.2, others=0.6)
    assert others_busy_cores(before, read_sample(proc)) == pytest.approx(0.6)


def test_niced_work_counts_and_so_does_our_own_when_we_are_niced():
    proc = FakeProc(cpus=2)
    before = read_sample(proc)
    proc.run(1.0, own=1.0, niced=1.0)  # another session's nice-19 build: an equal beside our group
    assert others_busy_cores(before, read_sample(proc)) == pytest.approx(1.0)
    niced = FakeProc(cpus=2, nice=10)
    before = read_sample(niced)
    niced.run(1.0, own=1.5, niced=0.5)  # our own time is then in the nice column: still ours
    assert others_busy_cores(before, read_sample(niced)) == pytest.approx(0.5)


def test_no_estimate_when_the_cpu_set_changed_or_no_time_passed():
    a = Sample(frozenset({0, 1}), busy=10, total=100, own=5)
    assert others_busy_cores(a, a) is None
    assert others_busy_cores(a, Sample(frozenset({0}), busy=20, total=200, own=6)) is None
    # our own ticks can run ahead of the machine's (they are read a moment later): never negative
    assert others_busy_cores(a, Sample(frozenset({0, 1}), busy=20, total=200, own=30)) == 0.0


@pytest.mark.parametrize("affinity, quota, usable", [
    (2, None, 2), (8, None, 8), (8, 2.0, 2), (8, 1.5, 1), (2, 4.0, 2), (4, 0.5, 1), (0, None, 1),
])
def test_usable_cpus_is_the_affinity_cut_to_the_quota_rounded_down(affinity, quota, usable):
    assert usable_cpus(affinity, quota) == usable


def test_cgroup_v2_quota_is_the_tightest_along_the_path(tmp_path):
    (tmp_path / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    own = tmp_path / "cgroup"
    own.write_text("0::/kubepods/pod1\n")
    assert cgroup_cpu_quota(tmp_path, own) == pytest.approx(1.5)
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path, own) == pytest.approx(3.0)


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("200000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    own = tmp_path / "cgroup"
    own.write_text("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")  # the path is not visible inside
    assert cgroup_cpu_quota(tmp_path, own) == pytest.approx(2.0)
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path, own) is None
    assert cgroup_cpu_quota(tmp_path, tmp_path / "missing") is None


def test_this_machine_can_be_read():
    sample = read_sample(ProcReader())
    assert sample.total > 0 and sample.own > 0
    assert 1 <= ContentionMonitor().threads <= len(sample.cpus)


# -- decisions --------------------------------------------------------------------------------


def test_quiet_machine_keeps_every_cpu():
    proc = FakeProc(cpus=2)
    monitor = monitor_on(proc)
    for _ in range(10):
        proc.run(SAMPLE_SECONDS, own=1.9, others=0.1)
        assert monitor.poll() == 2
    assert monitor.others == pytest.approx(0.1, abs=0.03)  # whole ticks


def test_a_competitor_on_one_core_takes_a_thread_at_once_and_gives_it_back_after_calm_windows():
    proc = FakeProc(cpus=2)
    monitor = monitor_on(proc)
    proc.run(SAMPLE_SECONDS, own=1.5, others=0.5)  # sharing a core fairly with one of our two threads
    assert monitor.poll() == 1
    for _ in range(5):  # now it has that core to itself
        proc.run(SAMPLE_SECONDS, own=1.0, others=1.0)
        assert monitor.poll() == 1
    proc.run(SAMPLE_SECONDS, own=1.0, others=0.0)  # it stopped
    assert [monitor.poll() for _ in range(3)] == [1, 1, 1]  # one calm window; then none has passed
    for _ in range(RETURN_AFTER_WINDOWS - 2):
        proc.run(SAMPLE_SECONDS, own=1.0, others=0.0)
        assert monitor.poll() == 1
    proc.run(SAMPLE_SECONDS, own=1.0, others=0.0)
    assert monitor.poll() == 2


def test_noise_inside_the_band_does_not_flap():
    proc = FakeProc(cpus=2)
    monitor = monitor_on(proc)
    proc.run(SAMPLE_SECONDS, own=1.2, others=0.8)
    assert monitor.poll() == 1
    # a competitor that is busy only part of the time: 0.45..1.3 cores in alternate windows
    for others in (0.45, 1.3, 0.5, 1.0, 0.45, 0.9) * 3:
        proc.run(SAMPLE_SECONDS, own=1.0, others=others)
        assert monitor.poll() == 1
    monitor_quiet = monitor_on(quiet := FakeProc(cpus=2))
    for others in (0.1, 0.3, 0.0, 0.33) * 3:
        quiet.run(SAMPLE_SECONDS, own=1.6, others=others)
        assert monitor_quiet.poll() == 2


def test_a_single_calm_window_between_busy_ones_does_not_give_a_core_back():
    proc = FakeProc(cpus=2)
    monitor = monitor_on(proc)
    proc.run(SAMPLE_SECONDS, own=1.0, others=1.0)
    assert monitor.poll() == 1
    for others in (0.0, 1.0) * 4:
        proc.run(SAMPLE_SECONDS, own=1.0, others=others)
        assert monitor.poll() == 1


def test_several_busy_cores_on_a_bigger_machine():
    proc = FakeProc(cpus=8)
    monitor = monitor_on(proc)
    proc.run(SAMPLE_SECONDS, own=5.5, others=2.5)  # three busy processes, sharing with us
    assert monitor.poll() == 5
    proc.run(SAMPLE_SECONDS, own=5.0, others=3.0)
    assert monitor.poll() == 5
    proc.run(SAMPLE_SECONDS, own=5.0, others=0.0)  # they all stopped
    assert monitor.poll() == 5  # one calm window so far
    proc.run(SAMPLE_SECONDS, own=8.0, others=0.0)
    assert monitor.poll() == 8
    proc.run(SAMPLE_SECONDS, own=1.0, others=7.0)  # everything else busy: still one thread
    assert monitor.poll() == 1


def test_only_the_affinity_cpus_count():
    proc = FakeProc(cpus=4, affinity={0, 1})
    monitor = monitor_on(proc)
    assert monitor.cores == 2
    proc.run(SAMPLE_SECONDS, own=2.0, others=0.0, cpus={0, 1})
    proc.ticks[2][0] += 50  # busy CPUs outside the mask are not our concern
    proc.ticks[3][0] += 50
    assert monitor.poll() == 2


def test_a_changed_affinity_mask_or_quota_is_followed():
    proc = FakeProc(cpus=4)
    monitor = monitor_on(proc)
    proc.run(SAMPLE_SECONDS, own=4.0)
    assert monitor.poll() == 4
    proc.cpu_set = {0, 1}  # taskset -p on the running server
    proc.run(SAMPLE_SECONDS, own=2.0)
    assert monitor.poll() == 2  # no estimate over a window whose CPU set changed, but the new size
    proc.run(SAMPLE_SECONDS, own=1.0, others=1.0)
    assert monitor.poll() == 1
    proc.quota = 1.0
    proc.cpu_set = {0, 1, 2, 3}
    proc.run(SAMPLE_SECONDS, own=1.0)
    assert monitor.poll() == 1


def test_a_quota_of_one_core_means_one_thread():
    proc = FakeProc(cpus=4, quota=1.0)
    monitor = monitor_on(proc)
    proc.run(SAMPLE_SECONDS, own=1.0)
    assert monitor.poll() == 1 and monitor.cores == 1


def test_polls_inside_a_window_read_nothing():
    proc = FakeProc(cpus=2)
    monitor = monitor_on(proc)
    reads = proc.reads
    proc.now += SAMPLE_SECONDS / 3
    for _ in range(5):
        monitor.poll()
    assert proc.reads == reads
    proc.now += SAMPLE_SECONDS
    monitor.poll()
    assert proc.reads == reads + 1


# -- applying the count -----------------------------------------------------------------------


def test_a_fixed_count_is_set_once_per_stepping_thread():
    applied = []
    threads = EngineThreads(3, apply=applied.append)
    assert threads.count == 3 and threads.others_busy_cores is None
    for _ in range(4):
        threads.tune()
    assert applied == [3]
    other = threading.Thread(target=threads.tune)  # a new stepping thread sets it again
    other.start()
    other.join()
    assert applied == [3, 3]


def test_auto_applies_each_change_and_logs_at_most_one_a_minute():
    proc = FakeProc(cpus=2)
    applied, lines = [], []
    threads = EngineThreads(None, log=lines.append, monitor_factory=lambda: monitor_on(proc), apply=applied.append,
                            clock=proc.clock)

    def contended_then_quiet():
        proc.run(SAMPLE_SECONDS, own=1.4, others=0.6)
        threads.tune()
        threads.tune()
        for _ in range(RETURN_AFTER_WINDOWS):
            proc.run(SAMPLE_SECONDS, own=1.0)
            threads.tune()

    assert threads.count == 2
    threads.tune()
    contended_then_quiet()
    contended_then_quiet()
    assert applied == [2, 1, 2, 1, 2]
    assert threads.count == 2
    assert lines[0].startswith("engine threads: auto")
    assert lines[1:] == ["engine threads 2 -> 1: other processes keep 0.6 of 2 usable CPUs busy"]
    proc.run(CHANGE_LOG_SECONDS, own=1.0, others=1.0)  # a busy minute: the next change is logged, with the count
    threads.tune()
    assert applied[-1] == 1
    assert lines[2:] == ["engine threads 2 -> 1: other processes keep 1.0 of 2 usable CPUs busy "
                         "(4 changes since the last such line)"]


def count_on_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_the_count_is_really_set_on_the_stepping_thread_only():
    before, default = torch.get_num_threads(), count_on_a_new_thread()
    seen = {}

    def step():
        EngineThreads(1).tune()
        seen["threads"] = torch.get_num_threads()
        seen["sum"] = float(torch.arange(100_000, dtype=torch.float64).sum())

    worker = threading.Thread(target=step)
    worker.start()
    worker.join()
    assert seen == {"threads": 1, "sum": 100_000 * 99_999 / 2}
    assert torch.get_num_threads() == before
    assert count_on_a_new_thread() == default  # no process-wide change


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("auto", None), ("AUTO", None), ("1", 1), ("16", 16)])
def test_parse_threads(text, value):
    assert parse_threads(text) == value


@pytest.mark.parametrize("text", ["0", "-2", "two", "", "1.5"])
def test_parse_threads_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="integer >= 1 or 'auto'"):
        parse_threads(text)


def test_serve_flag_reaches_the_engine_config(capsys):
    from loraquilt.__main__ import build_parser
    from loraquilt.server.engine_args import engine_config_from_args

    parser = build_parser("serve")
    assert engine_config_from_args(parser.parse_args(["serve"])).threads is None
    assert engine_config_from_args(parser.parse_args(["serve", "--threads", "auto"])).threads is None
    assert engine_config_from_args(parser.parse_args(["serve", "--threads", "1"])).threads == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--threads", "0"])
    assert "--threads: expected an integer >= 1 or 'auto', got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "2"])
def test_engine_config_refuses_bad_thread_counts(bad):
    with pytest.raises(ValueError, match="threads must be"):
        EngineConfig(threads=bad)
