"""Where clients were sent lately: each site's share of geo answers over a sliding window.

The DNS path only bumps plain counters (`Stats.answers_by_site`, summed over the
--workers processes); nothing on the query path knows about windows. An AnswerWindow
samples those counters every `step_s` seconds (the ops API runs `run()` beside the
server) and keeps `window_s` of samples; the share over the window is the live counters
minus the oldest sample inside it. A counter that went backwards (a worker restarted and
its part of the sum began again) counts from zero, never negative.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

WINDOW_S = 300.0
STEP_S = 5.0


@dataclass
class AnswerWindow:
    """Samples of the answers-by-site counters; `share()` over the last `window_s`."""

    read: Callable[[], Mapping[str, int]]
    window_s: float = WINDOW_S
    step_s: float = STEP_S
    clock: Callable[[], float] = time.monotonic
    _samples: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)

    def sample(self, now: float | None = None) -> None:
        """Record the counters (at most one sample per step); forget what left the window."""
        now = self.clock() if now is None else now
        if self._samples and now - self._samples[-1][0] < self.step_s:
            return
        self._samples.append((now, dict(self.read())))
        while len(self._samples) > 1 and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def share(self, sites: Iterable[str], now: float | None = None) -> dict[str, Any]:
        """Answers per site since the oldest sample in the window, and each one's share."""
        now = self.clock() if now is None else now
        current = dict(self.read())
        self.sample(now)
        base_t, base = now, current
        for t, counts in self._samples:
            if t >= now - self.window_s:
                base_t, base = t, counts
                break
        names = sorted(set(sites) | set(current))
        answers: dict[str, int] = {}
        for name in names:
            cur, old = current.get(name, 0), base.get(name, 0)
            answers[name] = cur - old if cur >= old else cur
        total = sum(answers.values())
        return {
            "window_s": self.window_s,
            "span_s": round(now - base_t, 3),
            "total": total,
            "sites": [
                {
                    "site": name,
                    "answers": answers[name],
                    "share": round(answers[name] / total, 4) if total else None,
                }
                for name in names
            ],
        }

    async def run(self) -> None:
        """Sample every `step_s` until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.step_s)
