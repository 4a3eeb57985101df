"""The peer engines in `bench serve`'s ratios and table."""

from __future__ import annotations

from loraquilt.bench.peers import ENGINES
from loraquilt.bench.serve_scenarios import THROUGHPUT
from loraquilt.bench.serve_systems import LQ, LQ_AUTO


def _tps(scenarios: dict, name: str, system: str) -> float | None:
    return scenarios.get(name, {}).get(system, {}).get("tokens_per_s")


def engine_ratios(scenarios: dict) -> dict[str, dict[str, float]]:
    """`ratios.<scenario>.<loraquilt system>_vs_<engine>` (tokens/s over tokens/s) for every
    throughput scenario where both ran; skipped engines have none."""
    out: dict[str, dict[str, float]] = {}
    for name in THROUGHPUT:
        for ours in (LQ, LQ_AUTO):
            for engine in ENGINES:
                mine, theirs = _tps(scenarios, name, ours), _tps(scenarios, name, engine)
                if mine is not None and theirs:
                    out.setdefault(name, {})[f"{ours}_vs_{engine}"] = mine / theirs
    return out


def print_engine_table(results: dict) -> None:
    """tokens/s of loraquilt_auto and each engine per throughput scenario, then the skips."""
    scenarios, engines = results["scenarios"], results.get("peer_engines") or {}
    if not engines:
        return
    rows = [("scenario tok/s", LQ_AUTO, *ENGINES, *(f"auto/{engine}" for engine in ENGINES))]
    for name in THROUGHPUT:
        if not any(_tps(scenarios, name, engine) for engine in ENGINES):
            continue
        auto = _tps(scenarios, name, LQ_AUTO)
        values = [_tps(scenarios, name, engine) for engine in ENGINES]
        rows.append((name, _fmt(auto), *(_fmt(v) for v in values),
                     *(f"{auto / v:.2f}x" if auto and v else "-" for v in values)))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    for engine, info in engines.items():
        if "skipped" in info:
            print(f"{engine} skipped: {info['skipped']}")
        elif info.get("idle_cpu_cores", 0) > 0.05:
            print(f"{engine}: {info['idle_cpu_cores']:.2f} cores busy while idle (it disturbed the others' runs)")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
