"""What a long evaluation shows while it runs: one bar over the episodes, and after it the env steps taken,
episodes running, retried (their worker died) and failed (ended by an error), and each policy's success rate
so far. A bar that moves once per episode would sit still for minutes on a CPU, so steps move it too."""

from __future__ import annotations

import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, refresh_s: float = 0.5):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, unit="ep")
        self.steps = self.retried = self.failed = 0
        self.running: set = set()
        self.tally: dict[str, list[int]] = {}
        self.refresh_s = refresh_s
        self._shown = 0.0

    def started(self, key) -> None:
        self.running.add(tuple(key))
        self._show()

    def stepped(self, n: int) -> None:
        self.steps += n
        self._show()

    def recorded(self, rec: dict) -> None:
        self.running.discard((rec["policy"], rec["suite"], rec["task_id"], rec["trial"]))
        t = self.tally.setdefault(rec["policy"], [0, 0])
        t[0] += bool(rec["success"])
        t[1] += 1
        self.failed += bool(rec.get("error"))
        self.bar.update(1)
        self._show(force=True)

    def retry(self, key) -> None:
        self.running.discard(tuple(key))
        self.retried += 1
        self._show(force=True)

    def line(self) -> str:
        rates = "  ".join(f"{k} {s}/{n} ({100 * s / n:.0f}%)" for k, (s, n) in self.tally.items() if n)
        return (f"steps {self.steps:,}  running {len(self.running)}  retried {self.retried}  "
                f"failed {self.failed}" + (f"  {rates}" if rates else ""))

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._shown >= self.refresh_s:
            self._shown = now
            self.bar.set_postfix_str(self.line(), refresh=True)

    def close(self) -> None:
        self.bar.close()


__all__ = ["Progress"]
