"""Hot routing keys get resident copies on several replicas (used by the ingress; no Ray here)."""

from __future__ import annotations

import math
import threading
from collections import Counter, deque

from loraquilt.client.routing import COPY_SEPARATOR


class HotKeys:
    """Spreads a routing key that carries too much of the recent traffic over copies
    ("key", "key#1", ...), each its own multiplexed id, so that it becomes resident on
    several replicas instead of loading one replica while the others idle. A key gets
    ceil(share x replicas x SPREAD) copies (at most one per replica): with 2 replicas, a
    key above 1/8 of the traffic is served by both. Requests take the copies in turn."""

    SPREAD = 4

    def __init__(self, replicas: int, window: int = 512):
        self.replicas = replicas
        self._recent: deque[str] = deque(maxlen=window)
        self._counts: Counter[str] = Counter()
        self._turns: Counter[str] = Counter()
        self._lock = threading.Lock()

    def route(self, key: str) -> str:
        with self._lock:
            if len(self._recent) == self._recent.maxlen:
                oldest = self._recent.popleft()
                self._counts[oldest] -= 1
                if not self._counts[oldest]:
                    del self._counts[oldest], self._turns[oldest]
            self._recent.append(key)
            self._counts[key] += 1
            share = self._counts[key] / len(self._recent)
            copies = min(self.replicas, math.ceil(share * self.replicas * self.SPREAD))
            if copies <= 1:
                return key
            turn = self._turns[key] % copies
            self._turns[key] += 1
        return key if turn == 0 else f"{key}{COPY_SEPARATOR}{turn}"
