"""The run directory: `episodes.jsonl` (one line per episode, exactly once, fsynced), `run.json` (the settings a
resumed run must share) and the videos. Only the process that drives the run writes here, whichever runner
ran the episodes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from duquant.eval.config import EvalConfig, RunMismatch
from duquant.eval.work import episode_key


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every complete JSON line (a line cut by a kill is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"[duquant eval] skipping an incomplete line in {p}", file=sys.stderr)
    return out


def drop_partial_line(path: Path) -> None:
    """A run killed mid-write leaves a line without its newline: cut it, so appended records stay one per
    line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"[duquant eval] dropping an incomplete last line of {path}", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(keep)


def check_run_file(cfg: EvalConfig) -> None:
    """Refuse a directory holding a run with other settings; note a label whose policy changed; then record
    the settings and policies."""
    run_file = Path(cfg.out) / "run.json"
    settings = cfg.settings()
    policies = cfg.policies
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if old.get("settings") != settings:
            raise RunMismatch(
                f"{cfg.out} holds a run with other settings {old.get('settings')} (now {settings}); "
                "use another --out, or the same settings to resume"
            )
        for label, spec in policies.items():
            prev = old.get("policies", {}).get(label)
            if prev is not None and prev != spec:
                print(f"[duquant eval] note: {label!r} was {prev} in earlier records of {cfg.out}, now {spec}",
                      file=sys.stderr)
        policies = {**old.get("policies", {}), **policies}
    write_atomic(run_file, json.dumps({"settings": settings, "policies": policies}, indent=2).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename: a kill leaves the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RecordLog:
    """Appends records to `<out>/episodes.jsonl`, each fsynced before it counts as done, and refuses to write
    an episode twice (a retried unit that replays one is ignored)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / "episodes.jsonl"
        drop_partial_line(self.path)
        self.records = read_records(self.path)
        self.done = {episode_key(r) for r in self.records}
        self._fh = None

    def add(self, rec: dict) -> bool:
        key = episode_key(rec)
        if key in self.done:
            return False
        if self._fh is None:
            self._fh = open(self.path, "a")
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.add(key)
        self.records.append(rec)
        return True

    def add_video(self, rel_path: str, data: bytes) -> None:
        write_atomic(self.out / rel_path, data)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


__all__ = ["read_records", "drop_partial_line", "check_run_file", "write_atomic", "RecordLog"]
