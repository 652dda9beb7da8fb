"""Pack files: one safetensors file per quantized layer, so later runs skip calibration and the transform.

``<packdir>/<layer name>.safetensors`` holds the layer's transform (smoothing vector, rotations, permutation), its
quantized weight (packed int4 or int8 codes, scales, zero points) and its bias. The safetensors metadata holds one
JSON string under ``"duquant"``:

    {"format_version": 3, "duquant_version": "...", "layer": name, "shape": [out, in], "config_hash": ...,
     "config": {...}, "weight_fingerprint": ..., "group": [names sharing the transform], "group_fingerprint": ...,
     "transform_kind": "duquant", "permutation": "zigzag", "calibrated": true, "act_clip": 0.9,
     "checksums": {tensor: sha256}, "meta_checksum": sha256 of this JSON without itself}

``<packdir>/manifest.json`` indexes the directory (layer -> file, hashes). Both are written atomically (temp file in
the same directory, fsync, ``os.replace``), so an interrupted run leaves no half-written pack. A pack whose config,
shape or weights differ is *stale* (recomputed, with a message); a pack that fails to parse or whose checksums do not
match is *corrupt* (an error that names the file; never half-loaded): the tensors are checksummed, and so is the
header (a flipped digit in "act_clip" must not give a silently different model). Files are created with the
process's umask (not mkstemp's 0600), so a server running as another user can read them.

The weight fingerprint is computed on the weight's own device (`weight_digest`: exact integer arithmetic, 16 bytes
to the host), so a pack written on a GPU matches on the CPU and the reverse.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 3  # 2: header checksum, tensor checksums cover dtype and shape; 3: weight_digest fingerprints
META_KEY = "duquant"


class PackError(RuntimeError):
    """A pack file is corrupt or unreadable; the message names the file and the fix."""


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def tensor_checksum(t: torch.Tensor) -> str:
    """sha256 of dtype, shape and bytes: a header flip from U8 to I8 keeps the bytes but changes the values."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()[:32]


# splitmix64 constants (Steele et al.): the position multipliers of `weight_digest`
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
DIGEST_LANES = 2  # 64-bit sums per tensor
DIGEST_BLOCK = 1 << 16  # positions per row of the cached multiplier table
DIGEST_SLAB = 1 << 24  # words widened to int64 at a time: temporaries stay near 128 MiB on any layer


def _i64(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (what a torch scalar can hold)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _odd_multipliers(index: torch.Tensor, salt: int) -> torch.Tensor:
    """splitmix64(index * GAMMA + salt) | 1 elementwise: int64 wrap-around products, logical shifts by masking."""
    z = index * _i64(_GAMMA) + _i64(salt)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _i64(_MIX1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _i64(_MIX2)
    return (z ^ ((z >> 31) & ((1 << 33) - 1))) | 1


@functools.lru_cache(maxsize=8)
def _block_multipliers(device: torch.device, block: int) -> torch.Tensor:
    j = torch.arange(block * DIGEST_LANES, dtype=torch.int64, device=device).view(block, DIGEST_LANES)
    return _odd_multipliers(j, 0).T.contiguous()  # (lanes, block)


def weight_digest(t: torch.Tensor, *, block: int = DIGEST_BLOCK, slab: int = DIGEST_SLAB) -> torch.Tensor:
    """A (DIGEST_LANES,) int64 digest of `t`'s bytes, computed on `t`'s own device.

    Copying every weight to the host to hash it took 18 s of an 84 s pi0 run on an H100; this reads the weight
    where it lies and moves 16 bytes. The bytes (row-major, zero-padded to whole words) are read as int32 words
    w_i; position i = c * block + j gets, per lane l, the odd multiplier M_l(i) = A_l(j) * B_l(c) with
    A_l(j) = mix(j * LANES + l, 0), B_l(c) = mix(c * LANES + l, 1), mix = `_odd_multipliers`; the digest is
    sum_i w_i * M_l(i) mod 2^64. Integer products and sums are exact modulo 2^64 in any order, so the CPU (int64
    matrix-vector products) and a GPU (products, then sums) give the same bits; no float arithmetic touches the bytes.
    One changed word changes every lane (a nonzero |d| < 2^32 times an odd number is nonzero mod 2^64); other
    changes collide with probability about 2^-64 per lane. Not cryptographic: it detects stale packs, not forgeries.
    `block` is part of the formula (tests pass a small one to reach several rows); `slab` only splits the work
    (rounded to whole blocks) and never changes the digest.
    """
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 4 or raw.storage_offset() % 4:  # whole, aligned int32 words; zero words add nothing
        raw = torch.cat([raw, raw.new_zeros(-raw.numel() % 4)])
    words = raw.view(torch.int32)
    table = _block_multipliers(words.device, block)
    lanes = torch.arange(DIGEST_LANES, device=words.device)
    acc = torch.zeros(DIGEST_LANES, dtype=torch.int64, device=words.device)
    step = max(slab // block, 1) * block
    for start in range(0, words.numel(), step):
        part = words[start:start + step]
        x = torch.empty(-(-part.numel() // block), block, dtype=torch.int64, device=words.device)
        x.view(-1)[:part.numel()] = part  # widened (sign-extended), the last row zero-padded
        x.view(-1)[part.numel():] = 0
        if x.device.type == "cpu":
            rows = torch.stack([torch.mv(x, a) for a in table], 1)
        else:  # CUDA has no int64 matrix-vector product
            rows = torch.stack([(x * a).sum(1) for a in table], 1)
        c = torch.arange(start // block, start // block + x.shape[0], device=words.device)
        acc += (rows * _odd_multipliers(c[:, None] * DIGEST_LANES + lanes, 1)).sum(0)
    return acc


def weight_fingerprint(weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The pack key of a layer's weights: blake2b of each tensor's shape, dtype and `weight_digest` (computed on
    the tensors' device, so the same weights give the same key on the CPU, on a GPU and in every process)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (weight, bias):
        if t is None:
            continue
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(weight_digest(t).cpu().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def group_fingerprint(fingerprints: list[str]) -> str:
    return hashlib.blake2b("|".join(fingerprints).encode(), digest_size=16).hexdigest()


def meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and safetensors) create 0600; packs are shared like any other file the user writes
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class Pack:
    meta: dict
    tensors: dict[str, torch.Tensor]


class PackStore:
    """A directory of per-layer packs."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.stale: list[tuple[str, str]] = []

    def path(self, name: str) -> Path:
        return self.root / f"{sanitize(name)}.safetensors"

    def sweep_orphans(self, max_age_s: float = 3600.0) -> list[Path]:
        """Remove temporary files that a killed writer left behind (``_atomic_write`` deletes its own on any
        exception, but not on SIGKILL or a power cut); returns what was removed. Only files older than
        `max_age_s`: another process writing into the same directory (a cluster run) holds its file for seconds."""
        if not self.root.is_dir():
            return []
        now = time.time()
        removed = []
        for tmp in self.root.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > max_age_s:
                    tmp.unlink()
                    removed.append(tmp)
            except FileNotFoundError:  # its writer finished or another sweep took it
                continue
        return removed

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {**meta, "format_version": FORMAT_VERSION, "layer": name,
                "checksums": {k: tensor_checksum(v) for k, v in tensors.items()}}
        meta["meta_checksum"] = meta_checksum(meta)
        path = self.path(name)
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))
        return path

    def read_meta(self, name: str) -> dict | None:
        """The header only (no tensor data read). None when there is no pack; PackError when unreadable."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise PackError(f"pack {path} is corrupt or truncated ({err}); delete it (or the whole PACKDIR) "
                            "and rerun to recompute it") from err
        if raw is None:
            raise PackError(f"{path} is not a duquant pack (no '{META_KEY}' metadata); remove it from PACKDIR")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise PackError(f"pack {path} has unreadable metadata ({err}); delete it and rerun") from err
        if not isinstance(meta, dict):
            raise PackError(f"pack {path} has unreadable metadata (not a JSON object); delete it and rerun")
        if meta.get("format_version") == FORMAT_VERSION and meta.get("meta_checksum") != meta_checksum(meta):
            raise PackError(f"pack {path} is corrupt: its header does not match its checksum; delete it and "
                            "rerun to recompute it")
        return meta

    def check(self, name: str, *, config_hash: str, shape: tuple[int, int],
              fingerprint: str) -> tuple[dict | None, str]:
        """(meta, "") when the pack is usable; (None, reason) when absent or stale."""
        meta = self.read_meta(name)
        if meta is None:
            return None, "no pack"
        if meta.get("format_version") != FORMAT_VERSION:
            return None, f"pack format {meta.get('format_version')} != {FORMAT_VERSION}"
        if meta.get("config_hash") != config_hash:
            return None, "config changed"
        if tuple(meta.get("shape", ())) != tuple(shape):
            return None, f"shape {meta.get('shape')} != {list(shape)}"
        if meta.get("weight_fingerprint") != fingerprint:
            return None, "weights changed"
        return meta, ""

    def load(self, name: str) -> Pack:
        """All tensors of a pack, verified against the checksums in its header."""
        path = self.path(name)
        meta = self.read_meta(name)
        if meta is None:
            raise PackError(f"no pack for {name} at {path}")
        try:
            tensors = load_file(str(path))
        except Exception as err:
            raise PackError(f"pack {path} is corrupt or truncated ({err}); delete it and rerun") from err
        expected = meta.get("checksums", {})
        if set(expected) != set(tensors):
            raise PackError(f"pack {path} is corrupt: tensors {sorted(tensors)} != {sorted(expected)}; delete it")
        for key, t in tensors.items():
            if tensor_checksum(t) != expected[key]:
                raise PackError(f"pack {path} is corrupt: checksum mismatch in {key!r}; delete it and rerun")
        return Pack(meta, tensors)

    def write_manifest(self, entries: dict[str, dict]) -> None:
        path = self.root / "manifest.json"
        old = {}
        if path.exists():
            try:
                old = json.loads(path.read_text()).get("layers", {})
            except (json.JSONDecodeError, OSError):
                old = {}
        old.update(entries)
        doc = {"format_version": FORMAT_VERSION, "layers": dict(sorted(old.items()))}

        def write(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(doc, indent=2, sort_keys=True))

        _atomic_write(path, write)
