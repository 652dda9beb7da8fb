"""Pack keys: `weight_digest` / `weight_fingerprint` (computed on the weight's device, pinned to an independent
implementation of the formula, the same for any layout and on the CPU and a GPU) and the rejection of packs written
with the previous key format."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from duquant.api import quantize
from duquant.config import DuQuantConfig
from duquant.packs import FORMAT_VERSION, META_KEY, PackStore, meta_checksum, weight_digest, weight_fingerprint

M64 = 2**64


def splitmix(x: int, salt: int) -> int:
    z = (x * 0x9E3779B97F4A7C15 + salt) % M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    return (z ^ (z >> 31)) | 1


def reference_digest(t: torch.Tensor, block: int) -> list[int]:
    """The documented formula in plain Python integers: the bytes as little-endian int32 words w_i (zero-padded),
    lane l = sum_i w_i * mix(j * 2 + l, 0) * mix(c * 2 + l, 1) mod 2^64 with i = c * block + j; unsigned."""
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    data += bytes(-len(data) % 4)
    words = struct.unpack(f"<{len(data) // 4}i", data)
    return [sum(w * splitmix((i % block) * 2 + lane, 0) * splitmix((i // block) * 2 + lane, 1)
                for i, w in enumerate(words)) % M64 for lane in range(2)]


def unsigned(d: torch.Tensor) -> list[int]:
    return [v % M64 for v in d.tolist()]


def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(7, 13, generator=g).bfloat16(),  # 91 bf16: the last word half padding
            torch.randn(5, 6, generator=g),  # float32
            torch.randn(3, 40, generator=g).half(),
            torch.tensor([-0.0, 1.5, float("inf"), float("nan")]).bfloat16(),
            torch.randint(-128, 127, (33,), dtype=torch.int8, generator=g)]


@pytest.mark.parametrize("block", [4, 8, 64, 1 << 16])
def test_digest_matches_an_independent_implementation(block):
    for t in tensors():
        assert unsigned(weight_digest(t, block=block, slab=8)) == reference_digest(t, block), (t.dtype, block)
        assert torch.equal(weight_digest(t, block=block, slab=8), weight_digest(t, block=block))  # slab: no effect


def test_fingerprint_is_pinned():
    """blake2b of shape, dtype and the digest (little-endian int64 lanes), per tensor: the same key in every process
    and release until FORMAT_VERSION says otherwise."""
    w = (torch.arange(24, dtype=torch.float32).view(4, 6) / 7).bfloat16()
    b = torch.tensor([1.0, -2.0, 3.0, 0.25])
    h = hashlib.blake2b(digest_size=16)
    for t in (w, b):
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(struct.pack("<2Q", *reference_digest(t, 1 << 16)))
    assert weight_fingerprint(w, b) == h.hexdigest() == "1c41d8b4ae631f278999857f1be558ca"


def test_any_change_changes_the_key():
    torch.manual_seed(1)
    w = torch.randn(96, 80).bfloat16()  # 3840 words: several blocks of 1024 with a partial last one
    b = torch.randn(96).bfloat16()
    base = weight_fingerprint(w, b)
    digest = weight_digest(w, block=1024)
    for index in [(0, 0), (0, 1), (47, 33), (95, 78), (95, 79)]:  # both halves of a word; the very last element
        w2 = w.clone()
        w2[index] = w2[index] + 1 if w2[index] != 0 else 1
        assert weight_fingerprint(w2, b) != base, index
        assert (weight_digest(w2, block=1024) != digest).all(), index  # one word: every lane moves
    w2 = w.clone()
    w2[95, 79] = -w2[95, 79]  # sign bit only
    assert weight_fingerprint(w2, b) != base
    b2 = b.clone()
    b2[-1] += 1
    assert weight_fingerprint(w, b2) != base
    assert weight_fingerprint(w, None) != base
    assert weight_fingerprint(w.view(80, 96), b) != base  # same bytes, other shape
    assert weight_fingerprint(w.view(torch.float16), b) != base  # same bytes, other dtype
    swapped = w.clone()
    swapped[[0, 1]] = w[[1, 0]]  # the same values in another order
    assert weight_fingerprint(swapped, b) != base


def test_layout_does_not_change_the_key():
    torch.manual_seed(2)
    w = torch.randn(64, 48).bfloat16()
    b = torch.randn(64).bfloat16()
    key = weight_fingerprint(w, b)
    transposed = w.t().contiguous().t()  # same values, column-major storage
    assert not transposed.is_contiguous() and weight_fingerprint(transposed, b) == key
    big = torch.randn(65, 48).bfloat16()
    big[1:] = w
    view = big[1:]  # contiguous, at an offset of 48 bf16 (one word and a half of storage offset per row)
    assert view.storage_offset() and weight_fingerprint(view, b) == key
    odd = torch.cat([torch.zeros(1).bfloat16(), b])[1:]  # offset of one bf16: not word-aligned
    assert weight_fingerprint(w, odd) == key
    assert weight_fingerprint(nn.Parameter(w.clone()), b) == key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_and_gpu_give_the_same_key():
    for t in tensors() + [torch.randn(3000, 4001).bfloat16()]:  # several slabs of 2^24 words... and blocks
        for block in (8, 1 << 16):
            assert torch.equal(weight_digest(t, block=block, slab=1 << 20),
                               weight_digest(t.cuda(), block=block, slab=1 << 20).cpu()), (t.shape, block)
    w, b = torch.randn(256, 192).bfloat16(), torch.randn(256).bfloat16()
    assert weight_fingerprint(w, b) == weight_fingerprint(w.cuda(), b.cuda())
    assert weight_fingerprint(w.t().contiguous().t(), b) == weight_fingerprint(w.cuda().t().contiguous().t(), b.cuda())


def _set_format_version(path, version: int) -> None:
    """Rewrite a pack as the previous release wrote it: same tensors, header claiming `version`."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    meta["format_version"] = version
    meta["meta_checksum"] = meta_checksum(meta)
    save_file(load_file(str(path)), str(path), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def test_packs_of_the_previous_key_format_are_recomputed(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))

    cfg = DuQuantConfig(include=r".*", method="rtn", block_size=16, packdir=str(tmp_path))
    first = quantize(make(), cfg, progress=False, verbose=False)
    assert (first.pack_hits, first.pack_misses) == (0, 2)
    store = PackStore(tmp_path)
    for name in ("0", "2"):
        assert store.read_meta(name)["format_version"] == FORMAT_VERSION == 3
        _set_format_version(store.path(name), 2)
    layer = make()[0]
    meta, why = store.check("0", config_hash=cfg.layer_hash("0"), shape=(48, 32),
                            fingerprint=weight_fingerprint(layer.weight, layer.bias))
    assert meta is None and why == "pack format 2 != 3"

    second = quantize(make(), cfg, progress=False, verbose=False)
    assert second.pack_misses == 2 and [why for _, why in second.stale] == ["pack format 2 != 3"] * 2
    assert store.read_meta("0")["format_version"] == 3  # rewritten in the current format
    third = quantize(make(), cfg, progress=False, verbose=False)
    assert (third.pack_hits, third.pack_misses) == (2, 0)
