"""Faults: `duquant quantize` killed while it writes packs, packs with flipped bytes or cut short. A resumed run
gives the uninterrupted model; a damaged pack gives an error naming the file or a recompute, never a silently
different model."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from duquant.api import quantize
from duquant.layers import DuQuantLinear
from duquant.packs import PackError, PackStore
from test_api import CFG, batches, calib_fn, make_model

# A small, fast run of the real CLI on the built-in tiny pi0: 28 packs (llm), q/k/v and gate/up share transforms.
QUANTIZE = ["--preset", "llm", "--rotation-steps", "2", "--calib-steps", "1", "--batch-size", "1",
            "--block-size", "32", "--no-eval"]


# Runs `duquant quantize` (argv after the first three), and SIGKILLs itself at pack number K (1-based) of the
# run, at a phase of the atomic write: "before" it starts, "half" (half the temp file written), "written" (temp
# file complete, not yet renamed) or "after" the rename. A deterministic kill point, no timing involved.
KILLER = """
import os, signal, sys
from pathlib import Path
import duquant.packs as packs
K, PHASE, count, atomic_write = int(sys.argv[1]), sys.argv[2], 0, packs._atomic_write

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def killing_write(path, write):
    global count
    if path.name == "manifest.json":
        return atomic_write(path, write)
    count += 1
    if count != K:
        return atomic_write(path, write)
    if PHASE == "before":
        die()

    def write_and_die(tmp):
        write(tmp)
        if PHASE == "half":
            data = Path(tmp).read_bytes()
            Path(tmp).write_bytes(data[: len(data) // 2])
        if PHASE in ("half", "written"):
            die()

    atomic_write(path, write_and_die)
    die()

packs._atomic_write = killing_write
from duquant.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_quantize(packdir: Path, *extra: str, kill_at: tuple[int, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPI_DUQUANT_")}
    args = ["quantize", *QUANTIZE, "--packdir", str(packdir), *extra]
    cmd = ["-m", "duquant.cli", *args] if kill_at is None else ["-c", KILLER, str(kill_at[0]), kill_at[1], *args]
    return subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def packs(packdir: Path) -> dict[str, Path]:
    return {p.name: p for p in packdir.glob("*.safetensors")}


def pack_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    packdir = tmp_path_factory.mktemp("uninterrupted")
    proc = run_quantize(packdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    found = packs(packdir)
    assert len(found) == 28, out
    return {name: pack_tensors(p) for name, p in found.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_killed_while_writing_packs_resumes_to_the_same_model(tmp_path, reference, seed):
    rng = random.Random(seed)
    k, phase = rng.randint(1, 27), ("half", "written", "after")[seed % 3]
    packdir = tmp_path / "packs"
    proc = run_quantize(packdir, kill_at=(k, phase))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    on_disk = packs(packdir)
    assert len(on_disk) == (k if phase == "after" else k - 1)
    temps = list(packdir.glob(".*.tmp"))
    assert len(temps) == (1 if phase in ("half", "written") else 0)  # the interrupted write stays hidden
    for path in on_disk.values():  # no half-written pack under a pack's name; checksums verified
        with safe_open(str(path), framework="pt") as f:
            layer = json.loads(f.metadata()["duquant"])["layer"]
        PackStore(packdir).load(layer)

    resumed = run_quantize(packdir, "--out", str(tmp_path / "result.json"))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    report = json.loads((tmp_path / "result.json").read_text())["report"]
    assert report["pack_hits"] + report["pack_misses"] == 28 and report["pack_misses"] > 0
    assert report["pack_hits"] <= len(on_disk)
    final = packs(packdir)
    assert set(final) == set(reference)
    for name, path in final.items():
        got, want = pack_tensors(path), reference[name]
        assert set(got) == set(want), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}:{key} differs from the uninterrupted run"


# ---- damaged packs, on the engine directly (a generic model, fast) ----------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A pack directory from a calibrated run, and the model it gives."""
    packdir = tmp_path_factory.mktemp("pristine")
    model = make_model()
    quantize(model, CFG.replace(packdir=str(packdir)), calibrate=calib_fn(batches()), progress=False, verbose=False)
    return packdir, quantized_state(model)


def quantized_state(model) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, DuQuantLinear):
            for key, t in m.state_dict().items():
                state[f"{name}.{key}"] = t.clone()
            state[f"{name}.act_clip"] = torch.tensor(m.act_clip)
            for key, t in m.transform.to_tensors("t.").items():
                state[f"{name}.{key}"] = t.clone()
    return state


def load_damaged(packdir: Path, victim: Path, data: bytes, reference: dict) -> str:
    """Write `data` as the victim pack, quantize from the directory; 'error' (naming the file) or 'same'."""
    victim.write_bytes(data)
    model = make_model()
    try:
        quantize(model, CFG.replace(packdir=str(packdir)), calibrate=calib_fn(batches()), progress=False,
                 verbose=False)
    except PackError as err:
        assert str(victim) in str(err), err
        return "error"
    state = quantized_state(model)
    assert state.keys() == reference.keys()
    for key, t in reference.items():
        assert torch.equal(state[key], t), f"{key}: a damaged pack gave a different model without an error"
    return "same"


def copy_packs(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("region", ["header", "data"])
def test_flipped_bytes_give_an_error_or_the_same_model(tmp_path, pristine, region):
    src, reference = pristine
    packdir = copy_packs(src, tmp_path / "packs")
    victim = PackStore(packdir).path("layers.0.k_proj")  # a member of the q/k/v group
    data = victim.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    lo, hi = (0, header_end) if region == "header" else (header_end, len(data))
    rng = random.Random(region)
    outcomes = []
    for _ in range(30):
        pos = rng.randrange(lo, hi)
        damaged = bytearray(data)
        damaged[pos] ^= rng.choice([0x01, 0x10, 0x20, 0xFF, rng.randrange(1, 256)])
        outcomes.append(load_damaged(packdir, victim, bytes(damaged), reference))
        victim.write_bytes(data)
    assert "error" in outcomes  # the checks do fire; "same" is a recompute or a harmless change (whitespace)
    # the dtype of a tensor rewritten in place (same bytes, other values) is caught too
    dtype_at = data.index(b'"dtype":"U8"') + len('"dtype":"')
    flipped = data[:dtype_at] + b"I" + data[dtype_at + 1:]
    assert load_damaged(packdir, victim, flipped, reference) == "error"


def test_truncated_packs_give_an_error_naming_the_file(tmp_path, pristine):
    src, reference = pristine
    packdir = copy_packs(src, tmp_path / "packs")
    victim = PackStore(packdir).path("layers.1.down_proj")
    data = victim.read_bytes()
    for cut in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        assert load_damaged(packdir, victim, data[:cut], reference) == "error", cut
    assert load_damaged(packdir, victim, data, reference) == "same"


def test_sweep_removes_only_old_orphaned_temp_files(tmp_path):
    """A SIGKILLed pack write leaves its mkstemp file; the next run removes it once it is clearly abandoned, never a
    file another writer may still be filling, a pack, or anything else in the directory."""
    import time

    store = PackStore(tmp_path)
    pack = store.save("layers.0.q_proj", {"w": torch.zeros(3)}, {})
    old = tmp_path / ".layers.0.k_proj.safetensors.x1y2z3.tmp"
    fresh = tmp_path / ".layers.0.v_proj.safetensors.a1b2c3.tmp"
    other = tmp_path / "notes.tmp"
    for f in (old, fresh, other):
        f.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(other, (two_hours_ago, two_hours_ago))
    assert store.sweep_orphans(max_age_s=3600) == [old]
    assert not old.exists() and fresh.exists() and other.exists() and pack.exists()
    assert PackStore(tmp_path / "missing").sweep_orphans() == []
