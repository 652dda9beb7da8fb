"""The policy's input: a typed Observation, openpi's image preprocessing, and the observation file format.

File format (`save_observations` / `load_observations`, `.safetensors` or `.npz`), N observations stacked:
    images.<camera>          float32 (N, 3, 224, 224) in [-1, 1]   (cameras: base_0_rgb, left_wrist_0_rgb, ...)
    image_masks.<camera>     bool    (N,)
    state                    float32 (N, state_dim)
    tokenized_prompt         int64   (N, L)
    tokenized_prompt_mask    bool    (N, L)
This is the calibration / evaluation file `duquant report --calib` and `duquant quantize --calib` read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Observation:
    images: dict[str, torch.Tensor]  # camera -> (B, 3, H, W) float in [-1, 1]
    image_masks: dict[str, torch.Tensor]  # camera -> (B,) bool
    state: torch.Tensor  # (B, state_dim)
    tokenized_prompt: torch.Tensor  # (B, L) int64
    tokenized_prompt_mask: torch.Tensor  # (B, L) bool

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None) -> Observation:
        def f(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return Observation({k: f(v) for k, v in self.images.items()},
                           {k: v.to(device) for k, v in self.image_masks.items()}, f(self.state),
                           self.tokenized_prompt.to(device), self.tokenized_prompt_mask.to(device))

    def select(self, indices) -> Observation:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Observation({k: v[idx] for k, v in self.images.items()},
                           {k: v[idx] for k, v in self.image_masks.items()}, self.state[idx],
                           self.tokenized_prompt[idx], self.tokenized_prompt_mask[idx])

    @staticmethod
    def concat(items: list[Observation]) -> Observation:
        first = items[0]
        return Observation({k: torch.cat([o.images[k] for o in items]) for k in first.images},
                           {k: torch.cat([o.image_masks[k] for o in items]) for k in first.image_masks},
                           torch.cat([o.state for o in items]),
                           torch.cat([o.tokenized_prompt for o in items]),
                           torch.cat([o.tokenized_prompt_mask for o in items]))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"images.{k}": v.float().contiguous() for k, v in self.images.items()}
        out.update({f"image_masks.{k}": v.bool().contiguous() for k, v in self.image_masks.items()})
        out.update(state=self.state.float().contiguous(), tokenized_prompt=self.tokenized_prompt.long().contiguous(),
                   tokenized_prompt_mask=self.tokenized_prompt_mask.bool().contiguous())
        return out

    @staticmethod
    def from_tensors(d: dict[str, torch.Tensor]) -> Observation:
        required = ("state", "tokenized_prompt", "tokenized_prompt_mask")
        missing = [k for k in required if k not in d]
        cams = [k.split(".", 1)[1] for k in d if k.startswith("images.")]
        if missing or not cams:
            raise ValueError(f"observation file lacks {missing or ['images.<camera>']}; expected keys "
                             "images.<camera>, image_masks.<camera>, state, tokenized_prompt, tokenized_prompt_mask")
        n = d["state"].shape[0]
        masks = {c: d.get(f"image_masks.{c}", torch.ones(n, dtype=torch.bool)).bool() for c in cams}
        return Observation({c: d[f"images.{c}"].float() for c in cams}, masks, d["state"].float(),
                           d["tokenized_prompt"].long(), d["tokenized_prompt_mask"].bool())


def save_observations(path: str | os.PathLike, observations: Observation | list[Observation]) -> None:
    """Write observations (stacked) to .safetensors or .npz, atomically."""
    obs = Observation.concat(observations) if isinstance(observations, list) else observations
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = obs.to_tensors()
    if path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **{k: v.numpy() for k, v in tensors.items()})
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp))
    else:
        raise ValueError(f"observation files are .safetensors or .npz, not {path.suffix!r}")
    os.replace(tmp, path)


def load_observations(path: str | os.PathLike) -> Observation:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"observation file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as z:
            tensors = {k: torch.from_numpy(z[k]) for k in z.files}
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        raise ValueError(f"observation files are .safetensors or .npz, not {path.suffix!r}")
    return Observation.from_tensors(tensors)


# ---- preprocessing as openpi does it -------------------------------------------------------------------------------

def resize_with_pad(images: torch.Tensor, height: int = 224, width: int = 224) -> torch.Tensor:
    """(B, H, W, 3) or (B, 3, H, W) -> (B, 3, height, width): keep the aspect ratio, pad with black (openpi)."""
    channels_last = images.shape[-1] == 3
    x = images.permute(0, 3, 1, 2) if channels_last else images
    is_uint8 = x.dtype == torch.uint8
    x = x.float()
    cur_h, cur_w = x.shape[-2:]
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    if is_uint8:
        x = x.round().clamp(0, 255)
        fill = 0.0
    else:
        x = x.clamp(-1.0, 1.0)
        fill = -1.0
    pad_h, pad_w = height - new_h, width - new_w
    top, left = pad_h // 2, pad_w // 2
    x = F.pad(x, (left, pad_w - left, top, pad_h - top), value=fill)
    return x.to(torch.uint8) if is_uint8 else x


def normalize_image(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def make_synthetic_observation(config, batch_size: int = 1, seed: int = 0, prompt_len: int | None = None
                               ) -> Observation:
    """Deterministic random observations for tests and the built-in report: smooth random images (low-frequency
    noise, like natural images), a random state, and a prompt of random length filling part of the token budget."""
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images, masks = {}, {}
    for i, key in enumerate(config.image_keys):
        low = torch.rand(batch_size, 3, 8, 8, generator=g) * 2 - 1
        img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        img = (img + 0.1 * torch.randn(batch_size, 3, size, size, generator=g)).clamp(-1, 1)
        images[key] = img
        masks[key] = torch.ones(batch_size, dtype=torch.bool) if i < 2 else torch.zeros(batch_size, dtype=torch.bool)
    L = config.max_token_len
    vocab = config.llm.vocab_size
    tokens = torch.randint(1, vocab, (batch_size, L), generator=g)
    n = prompt_len or max(4, L // 3)
    lengths = torch.randint(max(2, n // 2), n + 1, (batch_size,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    tokens = torch.where(mask, tokens, torch.zeros_like(tokens))
    tokens[:, 0] = 2  # BOS, where Gemma's massive activations live
    state = torch.randn(batch_size, config.action_dim, generator=g) * 0.5
    return Observation(images, masks, state, tokens, mask)
