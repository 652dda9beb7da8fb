"""The policy's input: a typed Observation, openpi's image preprocessing, and the observation file format.

`Observation` mirrors openpi's (`src/openpi/models/model.py::Observation`), batched, as torch tensors:
    images[camera]           float32 (B, 3, 224, 224) in [-1, 1]; cameras base_0_rgb, left_wrist_0_rgb,
                             right_wrist_0_rgb (uint8 (B, 3, H, W) or (B, H, W, 3) is accepted and converted)
    image_masks[camera]      bool (B,): False = camera absent (its tokens are padding); missing entry = True
    state                    float32 (B, state_dim)  (state_dim = action_dim = 32, normalized and zero-padded)
    tokenized_prompt         int64 (B, L)  (L = max_token_len: 48 for pi0, 200 for pi0.5)
    tokenized_prompt_mask    bool (B, L)

Observation file format (`save_observations` / `load_observations`; `.safetensors` or `.npz`), N observations
stacked along the first axis; this is the calibration / evaluation file other tools (`duquant quantize --calib`,
`duquant report --calib`, the LIBERO recorder) read and write:
    images.<camera>          float32 (N, 3, H, W) in [-1, 1]
    image_masks.<camera>     bool    (N,)          (optional: all True when absent)
    state                    float32 (N, state_dim)
    tokenized_prompt         int64   (N, L)
    tokenized_prompt_mask    bool    (N, L)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from duquant.models.config import IMAGE_KEYS


@dataclass
class Observation:
    images: dict[str, torch.Tensor]  # camera -> (B, 3, H, W) float in [-1, 1]
    image_masks: dict[str, torch.Tensor]  # camera -> (B,) bool
    state: torch.Tensor  # (B, state_dim) float
    tokenized_prompt: torch.Tensor  # (B, L) int64
    tokenized_prompt_mask: torch.Tensor  # (B, L) bool

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Observation:
        """Move to `device`; `dtype` applies to floating tensors only (images, state)."""
        def f(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return Observation({k: f(v) for k, v in self.images.items()},
                           {k: v.to(device) for k, v in self.image_masks.items()}, f(self.state),
                           self.tokenized_prompt.to(device), self.tokenized_prompt_mask.to(device))

    def map(self, fn) -> Observation:
        """The observation with `fn` applied to every tensor."""
        return Observation({k: fn(v) for k, v in self.images.items()}, {k: fn(v) for k, v in self.image_masks.items()},
                           fn(self.state), fn(self.tokenized_prompt), fn(self.tokenized_prompt_mask))

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor under its file-format name (`images.<camera>`, `state`, ...), in a fixed order."""
        return [*((f"images.{k}", v) for k, v in sorted(self.images.items())),
                *((f"image_masks.{k}", v) for k, v in sorted(self.image_masks.items())),
                ("state", self.state), ("tokenized_prompt", self.tokenized_prompt),
                ("tokenized_prompt_mask", self.tokenized_prompt_mask)]

    def select(self, indices: Sequence[int] | torch.Tensor | slice) -> Observation:
        """A sub-batch (indices list / tensor, or a slice)."""
        idx = indices if isinstance(indices, slice) else torch.as_tensor(indices, dtype=torch.long)
        return self.map(lambda t: t[idx])

    @staticmethod
    def concat(items: Sequence[Observation]) -> Observation:
        """Stack observations along the batch axis (same cameras and prompt length)."""
        if not items:
            raise ValueError("Observation.concat needs at least one observation")
        first = items[0]
        return Observation({k: torch.cat([o.images[k] for o in items]) for k in first.images},
                           {k: torch.cat([o.image_masks[k] for o in items]) for k in first.image_masks},
                           torch.cat([o.state for o in items]),
                           torch.cat([o.tokenized_prompt for o in items]),
                           torch.cat([o.tokenized_prompt_mask for o in items]))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The flat dict of the file format (see the module docstring)."""
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


def save_observations(path: str | os.PathLike, observations: Observation | Sequence[Observation]) -> Path:
    """Write observations (stacked) to .safetensors or .npz, atomically (the format is in the module docstring)."""
    obs = observations if isinstance(observations, Observation) else Observation.concat(list(observations))
    path = Path(path)
    if path.suffix not in (".npz", ".safetensors"):
        raise ValueError(f"observation files are .safetensors or .npz, not {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.cpu() for k, v in obs.to_tensors().items()}
    if path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **{k: v.numpy() for k, v in tensors.items()})
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp))
    mask = os.umask(0o022)  # safetensors creates 0600: give the file the mode any file of the user gets
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
    return path


def load_observations(path: str | os.PathLike) -> Observation:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"observation file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                tensors = {k: torch.from_numpy(z[k]) for k in z.files}
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            raise ValueError(f"observation files are .safetensors or .npz, not {path.suffix!r}")
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"{path} is not a readable observation file ({err}); it may be truncated") from err
    return Observation.from_tensors(tensors)


# ---- preprocessing as openpi does it -----------------------------------------------------------------------------

def resize_with_pad(images: torch.Tensor, height: int = 224, width: int = 224) -> torch.Tensor:
    """openpi's `resize_with_pad_torch`: keep the aspect ratio (bilinear), pad to (height, width) with black
    (0 for uint8, -1.0 for float in [-1, 1]). Input (B, H, W, C) with C <= 4 or (B, C, H, W); output always
    channels-first (B, C, height, width) (openpi returns the input's layout; our Observation is channels-first)."""
    channels_last = images.shape[-1] <= 4
    x = images.permute(0, 3, 1, 2) if channels_last else images
    if x.dtype not in (torch.uint8, torch.float32):
        x = x.float()
    cur_h, cur_w = x.shape[-2:]
    if (cur_h, cur_w) == (height, width):
        return x
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = F.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
    if x.dtype == torch.uint8:
        resized, fill = resized.round().clamp(0, 255).to(torch.uint8), 0
    else:
        resized, fill = resized.clamp(-1.0, 1.0), -1.0
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return F.pad(resized, (left, width - new_w - left, top, height - new_h - top), value=fill)


def normalize_image(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], exactly as openpi's `Observation.from_dict` (x / 255 * 2 - 1)."""
    return images.float() / 255.0 * 2.0 - 1.0


def preprocess_observation(obs: Observation, image_keys: Sequence[str] = IMAGE_KEYS, image_size: int = 224
                           ) -> Observation:
    """openpi's inference preprocessing: images to channels-first float in [-1, 1] at image_size x image_size
    (resize with pad when needed), a mask of True for cameras that have none. Returns `obs` itself when nothing
    changes, so calling it on prepared inputs costs nothing."""
    images, masks, changed = dict(obs.images), dict(obs.image_masks), False
    for key, img in obs.images.items():
        out = img
        if out.dim() == 4 and out.shape[1] not in (1, 3) and out.shape[-1] in (1, 3):
            out = out.permute(0, 3, 1, 2)  # channels-last -> channels-first
        if tuple(out.shape[-2:]) != (image_size, image_size):
            out = resize_with_pad(out, image_size, image_size)
        if out.dtype == torch.uint8:
            out = normalize_image(out)
        if out is not img:
            images[key], changed = out, True
    for key in image_keys:
        if key in images and key not in masks:
            masks[key], changed = torch.ones(obs.batch_size, dtype=torch.bool, device=obs.state.device), True
    if not changed:
        return obs
    return Observation(images, masks, obs.state, obs.tokenized_prompt, obs.tokenized_prompt_mask)


def make_synthetic_observation(config, batch_size: int = 1, seed: int = 0, prompt_len: int | None = None
                               ) -> Observation:
    """Deterministic (from `seed`) random observations for tests, demos and the built-in report: smooth random
    images (low-frequency noise plus a little pixel noise, like natural images), a random state, and prompts of
    random length (BOS = 2 first) filling part of the token budget. Cameras follow `config.image_keys`; the
    third one (right wrist) is masked out, as in openpi's LIBERO inputs for pi0."""
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images, masks = {}, {}
    for i, key in enumerate(config.image_keys):
        low = torch.rand(batch_size, 3, 8, 8, generator=g) * 2 - 1
        img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        images[key] = (img + 0.1 * torch.randn(batch_size, 3, size, size, generator=g)).clamp(-1, 1)
        masks[key] = torch.full((batch_size,), i < 2, dtype=torch.bool)
    L, vocab = config.max_token_len, config.llm.vocab_size
    tokens = torch.randint(3, vocab, (batch_size, L), generator=g)
    n = min(prompt_len or max(4, L // 3), L)
    lengths = torch.randint(max(2, n // 2), n + 1, (batch_size,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    tokens = torch.where(mask, tokens, torch.zeros_like(tokens))
    tokens[:, 0] = 2  # BOS, where Gemma's massive activations live
    state = torch.randn(batch_size, config.action_dim, generator=g) * 0.5
    return Observation(images, masks, state, tokens, mask)
