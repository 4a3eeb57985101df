"""The four systems `loraquilt bench serve` measures, alive side by side in one run.

Two pairs on the same NF4 base, adapters, prompts and greedy decoding:

* the exact pair: `loraquilt serve --dtype float32` (``loraquilt``) against transformers +
  PEFT computing exactly in float32 (``peft``); their greedy tokens must be identical;
* as users get them: `loraquilt serve --dtype auto` (``loraquilt_auto``) against
  transformers + PEFT with the user's defaults (``peft_default``: bitsandbytes' default CPU
  path, its fused AVX512-BF16 kernel where the CPU has one).

Both servers are separate processes and both peers live in the bench process; an idle
system uses no CPU, so each scenario runs the systems one after another, repeat by repeat.
When `--dtype auto` resolves to float32 the auto server would be the float32 one again:
unless asked for a separate one, ``loraquilt_auto`` then reuses the ``loraquilt`` server and
its figures (``settings.auto_same_as_float32``).

With `--peers`, the peer engines (vLLM, llama.cpp: see ``bench/peers``) join the throughput
scenarios after these four, each in a process of its own, idle while the others run.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loraquilt.bench.peers import ENGINES

LQ, LQ_AUTO, PEFT, PEFT_DEFAULT = "loraquilt", "loraquilt_auto", "peft", "peft_default"
ORDER = (LQ, PEFT, LQ_AUTO, PEFT_DEFAULT, *ENGINES)  # the order of the systems within a repeat
SERVERS, PEERS = (LQ, LQ_AUTO), (PEFT, PEFT_DEFAULT)
DTYPE_ARGS = {LQ: ("--dtype", "float32"), LQ_AUTO: ("--dtype", "auto")}


def resolve_auto_dtype() -> tuple[str, str]:
    """(dtype name, reason) `loraquilt serve --dtype auto` resolves to on this CPU."""
    import torch

    from loraquilt.server.model.dtype import dtype_name, resolve_compute_dtype

    dtype, reason = resolve_compute_dtype("auto", torch.device("cpu"))
    return dtype_name(dtype), reason


@dataclass
class Systems:
    """Started servers and loaded peers, by system name; ``loraquilt_auto`` may be the very
    ``loraquilt`` server (``auto_shared``)."""

    servers: dict = field(default_factory=dict)
    peers: dict = field(default_factory=dict)
    auto_shared: bool = False
    engines: dict = field(default_factory=dict)  # peer engines (bench/peers.engines), throughput scenarios only

    @property
    def measured(self) -> list[str]:
        """Systems run one after another in each repeat (a shared auto server runs once)."""
        present = {*self.servers, *self.peers, *self.engines}
        return [s for s in ORDER if s in present and not (s == LQ_AUTO and self.auto_shared)]

    @property
    def present(self) -> list[str]:
        return [s for s in ORDER if s in self.servers or s in self.peers or s in self.engines]

    def distinct_servers(self) -> list[str]:
        return [s for s in SERVERS if s in self.servers and not (s == LQ_AUTO and self.auto_shared)]

    def throughput(self, system: str, prompts: list[str], adapters: list[str | None], new_tokens: int):
        runner = self.servers.get(system) or self.peers.get(system) or self.engines[system]
        return runner.throughput(prompts, adapters, new_tokens)

    def stop(self) -> None:
        servers = [self.servers[system] for system in self.distinct_servers()]
        for server in servers:  # signal every server first: they drain side by side
            server.stop(wait=False)
        for server in servers:
            server.stop()
        for engine in self.engines.values():
            engine.stop()
        self.engines.clear()
        self.servers.clear()
        self.peers.clear()
        gc.collect()


def start_systems(model_folder: Path, adapter_root: Path, *, want_servers: bool, want_peers: bool,
                  auto_dtype: str, separate_auto: bool, max_batch_size: int, max_active_adapters: int,
                  log: Callable[[str], None]) -> Systems:
    """Start what the chosen scenarios need: both servers and/or both peers."""
    from loraquilt.bench.peft_peer import PeftPeer
    from loraquilt.bench.server_side import ServedLoraQuilt, free_port

    systems = Systems(auto_shared=auto_dtype == "float32" and not separate_auto)
    try:
        if want_servers:
            for system in SERVERS:
                if system == LQ_AUTO and systems.auto_shared:
                    systems.servers[LQ_AUTO] = systems.servers[LQ]
                    continue
                log(f"starting loraquilt serve {' '.join(DTYPE_ARGS[system])} ({system})")
                systems.servers[system] = ServedLoraQuilt(
                    model_folder, adapter_root, port=free_port(), max_batch_size=max_batch_size,
                    max_active_adapters=max_active_adapters, max_cpu_adapters=max(256, 2 * max_batch_size),
                    max_seq_len=256, log=log, extra_args=DTYPE_ARGS[system])
        if want_peers:
            for system, exact in ((PEFT, True), (PEFT_DEFAULT, False)):
                log(f"loading transformers + PEFT peer ({system})")
                systems.peers[system] = PeftPeer(model_folder, exact_fp32=exact, log=log)
    except BaseException:
        systems.stop()
        raise
    return systems
