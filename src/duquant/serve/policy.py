"""Policies the server runs: `infer(obs: dict) -> dict` and `reset()`, like openpi's `BasePolicy`.

`ModelPolicy` is openpi's `Policy` for our pi0 / pi0.5 with the transforms of openpi's `pi0_libero` /
`pi05_libero` configs (`create_trained_policy` order):
  inputs   LiberoInputs -> Normalize(state) -> ResizeImages(224) -> TokenizePrompt -> PadStatesAndActions
  model    uint8 images -> float x/255*2-1, batched, `sample_actions` (openpi's `Observation.from_dict`)
  outputs  Unnormalize(state, actions) -> AbsoluteActions (pi0_libero only) -> first 7 action dims
- LiberoInputs: "observation/image" -> base_0_rgb, "observation/wrist_image" -> left_wrist_0_rgb, a black
  right_wrist_0_rgb whose mask is False (openpi masks the padded camera for pi0 and pi0.5, not for pi0-FAST);
  float or CHW images are converted to uint8 HWC first.
- Normalisation from norm_stats.json: z-score `(x-mean)/(std+1e-6)` for pi0, quantile
  `(x-q01)/(q99-q01+1e-6)*2-1` for pi0.5 (openpi: quantiles for every model type but PI0).
- pi0_libero trains with `extra_delta_transform=True`: the model predicts a[:6] - state[:6], so the output
  adds the (unnormalised) state back to the first 6 dims. pi05_libero does not, and sets
  `discrete_state_input=False`: the state is not written into the prompt (pi0.5 has no state token either, so
  it does not reach the model).
`GenericPolicy` is the passthrough for other robots: model-named cameras and state in, all action dims out.

Nothing here imports torch at module level (the eval client imports this file's siblings without torch).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from duquant.serve.guards import (
    LIBERO_STATE_DIM,
    STATE_PAD_POLICIES,
    InputError,
    check_finite,
    small_image_warning,
    state_length,
    tokenize_bounded,
)
from duquant.serve.wire import resize_with_pad

LIBERO_IMAGE, LIBERO_WRIST, LIBERO_STATE = "observation/image", "observation/wrist_image", "observation/state"
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
logger = logging.getLogger("duquant.serve")
PALIGEMMA_TOKENIZER_CACHE = Path("~/.cache/openpi/big_vision/paligemma_tokenizer.model").expanduser()


class BasePolicy:
    """openpi_client.base_policy.BasePolicy, plus `infer_batch` (the server's dynamic batching) and
    metadata."""

    metadata: dict = {}

    def infer(self, obs: dict) -> dict:
        raise NotImplementedError

    def infer_batch(self, batch: list[dict]) -> list[dict]:
        return [self.infer(o) for o in batch]

    def reset(self) -> None:
        pass


# ---- normalisation statistics ------------------------------------------------------------------------------

@dataclass
class NormStats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None


def _arr(v) -> np.ndarray | None:
    return None if v is None else np.asarray(v, dtype=np.float64)


def load_norm_stats(path: str | os.PathLike) -> dict[str, NormStats]:
    """openpi's norm_stats.json ({"norm_stats": {"state": {...}, "actions": {...}}}, or a directory holding
    it) or LeRobot's normalizer safetensors ("observation.state.mean", "action.q99", ...)."""
    p = Path(path)
    if p.is_dir():
        p = p / "norm_stats.json"
    if not p.exists():
        raise FileNotFoundError(f"norm stats file not found at {p}")
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        names = {"observation.state": "state", "action": "actions"}
        grouped: dict[str, dict] = {}
        for key, value in load_file(str(p)).items():
            feature, stat = key.rsplit(".", 1)
            if feature in names:
                grouped.setdefault(names[feature], {})[stat] = value
        raw = grouped
    else:
        data = json.loads(p.read_text())
        raw = data.get("norm_stats", data)
    stats = {}
    for key, s in raw.items():
        if "mean" not in s or "std" not in s:
            raise ValueError(f"norm stats for {key!r} in {p} lack mean/std (keys: {sorted(s)})")
        stats[key] = NormStats(_arr(s["mean"]), _arr(s["std"]), _arr(s.get("q01")), _arr(s.get("q99")))
    return stats


def save_norm_stats(path: str | os.PathLike, stats: dict[str, NormStats]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    body = {k: {f: getattr(s, f).tolist() for f in ("mean", "std", "q01", "q99") if getattr(s, f) is not None}
            for k, s in stats.items()}
    p.write_text(json.dumps({"norm_stats": body}, indent=2))
    return p


def pad_to_dim(x: np.ndarray, dim: int, value: float = 0.0) -> np.ndarray:
    if x.shape[-1] >= dim:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])]
    return np.pad(x, pad, constant_values=value)


def normalize(x: np.ndarray, s: NormStats, quantile: bool) -> np.ndarray:
    d = x.shape[-1]
    if quantile:
        _need_quantiles(s)
        q01, q99 = s.q01[..., :d], s.q99[..., :d]
        return (x - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
    return (x - s.mean[..., :d]) / (s.std[..., :d] + 1e-6)


def unnormalize(x: np.ndarray, s: NormStats, quantile: bool) -> np.ndarray:
    d = x.shape[-1]
    if quantile:
        _need_quantiles(s)
        q01, q99 = s.q01[..., :d], s.q99[..., :d]
        k = q01.shape[-1]
        head = (x[..., :k] + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01
        return np.concatenate([head, x[..., k:]], axis=-1) if k < d else head
    mean = pad_to_dim(s.mean, d, 0.0)[..., :d]
    std = pad_to_dim(s.std, d, 1.0)[..., :d]
    return x * (std + 1e-6) + mean


def _need_quantiles(s: NormStats) -> None:
    if s.q01 is None or s.q99 is None:
        raise ValueError(
            "quantile normalisation (pi0.5) needs q01 and q99 in norm_stats.json; these stats have only "
            "mean/std (use --norm zscore if the checkpoint was trained with z-scores)"
        )


# ---- transforms --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transforms:
    """What openpi's data and model transforms do for one robot + model type."""

    robot: str = "libero"  # libero | generic
    use_quantiles: bool = False  # openpi: every model type but PI0
    delta_action_dims: int = 0  # AbsoluteActions mask width (pi0_libero: 6); 0 = off
    action_dims: int | None = 7  # dims returned (LIBERO: 7); None = all
    discrete_state_input: bool = False  # pi0.5: state written into the prompt (pi05_libero: False)
    mask_padded_cameras: bool = False  # openpi: True only for pi0-FAST
    default_prompt: str | None = None
    image_size: int = 224
    state_pad: str = "error"  # a state shorter than expected: error | zero (see duquant.serve.guards)

    @classmethod
    def for_libero(cls, pi05: bool) -> Transforms:
        """openpi's pi0_libero (z-score, extra delta transform) or pi05_libero (quantile, no delta, no state
        text)."""
        return cls(robot="libero", use_quantiles=pi05, delta_action_dims=0 if pi05 else 6, action_dims=7)

    @classmethod
    def generic(cls, pi05: bool) -> Transforms:
        return cls(robot="generic", use_quantiles=pi05, delta_action_dims=0, action_dims=None)


def parse_image(image, name: str = "image") -> np.ndarray:
    """openpi's _parse_image: float [0, 1] -> uint8, CHW -> HWC (a non-finite float image is refused)."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating):
        check_finite(name, image)
        image = (255 * image).astype(np.uint8)
    if image.ndim == 3 and image.shape[0] == 3:
        image = np.transpose(image, (1, 2, 0))
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"{name}: images must be (H, W, 3) uint8 or float in [0, 1] (CHW accepted); got "
                         f"shape {image.shape} dtype {image.dtype}")
    return image


def _prompt(obs: dict, default: str | None) -> str:
    prompt = obs.get("prompt", default)
    if prompt is None:
        raise InputError(
            "Prompt is required: send a 'prompt' string with the observation (or start the server "
            "with --default-prompt)"
        )
    if isinstance(prompt, bytes):
        prompt = prompt.decode()
    if not isinstance(prompt, str):
        prompt = np.asarray(prompt).item()
    return str(prompt)


def libero_inputs(obs: dict, mask_padded: bool = False) -> dict:
    missing = [k for k in (LIBERO_IMAGE, LIBERO_WRIST, LIBERO_STATE) if k not in obs]
    if missing:
        raise InputError(f"LIBERO observation lacks {missing}; expected keys {LIBERO_IMAGE!r} (uint8 HxWx3), "
                         f"{LIBERO_WRIST!r}, {LIBERO_STATE!r} (8 floats) and 'prompt'; got {sorted(obs)}")
    base = parse_image(obs[LIBERO_IMAGE], LIBERO_IMAGE)
    wrist = parse_image(obs[LIBERO_WRIST], LIBERO_WRIST)
    return {"state": np.asarray(obs[LIBERO_STATE]),
            "image": {CAMERAS[0]: base, CAMERAS[1]: wrist, CAMERAS[2]: np.zeros_like(base)},
            "image_mask": {CAMERAS[0]: True, CAMERAS[1]: True, CAMERAS[2]: bool(mask_padded)}}


def generic_inputs(obs: dict, cameras: tuple[str, ...], mask_padded: bool = False) -> dict:
    images = obs.get("image", obs.get("images"))
    if not isinstance(images, dict) or not images or "state" not in obs:
        raise InputError(
            "generic observation: expected {'image': {camera: HxWx3 uint8}, 'state': [...], 'prompt': "
            f"str}} with cameras among {list(cameras)}; got keys {sorted(obs)}"
        )
    unknown = sorted(set(images) - set(cameras))
    if unknown:
        raise InputError(f"unknown camera(s) {unknown}; the model's cameras are {list(cameras)}")
    parsed = {k: parse_image(v, f"image[{k!r}]") for k, v in images.items()}
    masks_in = obs.get("image_mask", obs.get("image_masks", {})) or {}
    first = next(iter(parsed.values()))
    image, mask = {}, {}
    for cam in cameras:
        if cam in parsed:
            image[cam], mask[cam] = parsed[cam], bool(np.asarray(masks_in.get(cam, True)))
        else:
            image[cam], mask[cam] = np.zeros_like(first), bool(mask_padded)
    return {"state": np.asarray(obs["state"]), "image": image, "image_mask": mask}


# ---- the model policy --------------------------------------------------------------------------------------

class Preprocessor:
    """openpi's input and output transforms for one model config (no model needed: `duquant record` uses it
    alone)."""

    def __init__(self, config, transforms: Transforms, norm_stats: dict[str, NormStats] | None = None,
                 tokenizer=None):
        self.config = config
        self.transforms = transforms
        self.norm_stats = norm_stats or {}
        if transforms.use_quantiles:
            for s in self.norm_stats.values():
                _need_quantiles(s)
        if tokenizer is None:
            from duquant.models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(None, max_len=config.max_token_len, vocab_size=config.llm.vocab_size)
        self.tokenizer = tokenizer
        self._warned: dict[str, int] = {}

    def prepare(self, obs: dict) -> dict:
        """A request -> the model-format numpy dict (state normalised and padded, 224 uint8 images,
        tokens)."""
        if not isinstance(obs, dict):
            raise InputError(f"an observation must be a dict, got {type(obs).__name__}")
        t = self.transforms
        if t.robot == "libero":
            data = libero_inputs(obs, t.mask_padded_cameras)
        else:
            data = generic_inputs(obs, self.config.image_keys, t.mask_padded_cameras)
        try:
            state = np.asarray(data["state"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise InputError(f"state must be a vector of numbers ({err})") from err
        if state.ndim != 1:
            raise InputError(f"state must be a vector, got shape {state.shape}")
        check_finite(LIBERO_STATE if t.robot == "libero" else "state", state)
        warnings: list[str] = []
        expected = self.expected_state_dim()
        n_state = state.shape[-1]
        target = state_length(n_state, expected, t.state_pad, self._state_layout())
        if "state" in self.norm_stats:
            state = normalize(state, self.norm_stats["state"], t.use_quantiles)
        if target > n_state:  # the opted-in pad policy: zeros after normalisation
            state = np.concatenate([state, np.zeros(target - n_state)])
            warnings.append(f"state of {n_state} dims padded with zeros to {target} (--state-pad zero)")
        if state.shape[-1] > self.config.action_dim:
            raise InputError(
                f"state has {state.shape[-1]} dims, more than the model's action_dim {self.config.action_dim}"
            )
        for cam, img in data["image"].items():
            if data["image_mask"][cam]:  # the black stand-ins for absent cameras are the sent ones' size
                w = small_image_warning(cam, img.shape)
                if w is not None:
                    warnings.append(w)
        images = {k: resize_with_pad(v, t.image_size, t.image_size) for k, v in data["image"].items()}
        prompt = _prompt(obs, t.default_prompt)
        tokens, token_mask, cut = tokenize_bounded(self.tokenizer, prompt,
                                                   state if t.discrete_state_input else None)
        if cut is not None:
            warnings.append(cut)
        for w in warnings:
            self._warn(w)
        out = {
            "state": pad_to_dim(state, self.config.action_dim),
            "image": images,
            "image_mask": data["image_mask"],
            "tokenized_prompt": np.asarray(tokens),
            "tokenized_prompt_mask": np.asarray(token_mask, dtype=bool),
        }
        if warnings:
            out["warnings"] = warnings
        return out

    def expected_state_dim(self) -> int | None:
        """The state length requests must have: LIBERO's 8, or a generic robot's norm-stats length (None:
        unknown, any length up to the model's action_dim)."""
        if self.transforms.robot == "libero":
            return LIBERO_STATE_DIM
        stats = self.norm_stats.get("state")
        return None if stats is None else int(stats.mean.shape[-1])

    def _state_layout(self) -> str:
        if self.transforms.robot == "libero":
            return "LIBERO: eef position 3, axis-angle 3, gripper 2"
        return "the length of the state in the norm stats"

    def _warn(self, message: str) -> None:
        """Log a warning the first time, then at 10, 100, ... repeats (a client repeating it every step would
        flood the log)."""
        n = self._warned.get(message, 0) + 1
        if len(self._warned) < 1000 or n > 1:
            self._warned[message] = n
        if n == 1 or (n >= 10 and str(n).strip("0") == "1"):
            logger.warning("%s%s", message, f" (seen {n} times)" if n > 1 else "")

    def to_observation(self, prepared: list[dict]):
        """Stack prepared inputs into a batched model Observation (uint8 -> x/255*2-1, as openpi does)."""
        import torch

        from duquant.models.observation import Observation

        cams = [k for k in self.config.image_keys if k in prepared[0]["image"]]
        images = {}
        for k in cams:
            arr = np.stack([p["image"][k] for p in prepared]).astype(np.float32) / 255.0 * 2.0 - 1.0
            images[k] = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        masks = {k: torch.tensor([bool(p["image_mask"][k]) for p in prepared]) for k in cams}
        state = torch.from_numpy(np.stack([p["state"] for p in prepared]).astype(np.float32))
        tokens = torch.from_numpy(np.stack([p["tokenized_prompt"] for p in prepared]).astype(np.int64))
        tmask = torch.from_numpy(np.stack([p["tokenized_prompt_mask"] for p in prepared]))
        return Observation(images, masks, state, tokens, tmask)

    def finish(self, prepared: dict, actions: np.ndarray) -> dict:
        """Model actions (horizon, action_dim) -> the reply: unnormalised, state added back (delta), cut to
        the robot's dims."""
        t = self.transforms
        state = prepared["state"]
        if "state" in self.norm_stats:
            state = unnormalize(state, self.norm_stats["state"], t.use_quantiles)
        if "actions" in self.norm_stats:
            actions = unnormalize(actions, self.norm_stats["actions"], t.use_quantiles)
        if t.delta_action_dims:
            d = t.delta_action_dims
            actions = np.array(actions, copy=True)
            actions[..., :d] += state[..., :d][None, :]
        if t.action_dims is not None:
            actions = actions[..., : t.action_dims]
        out = {"actions": np.asarray(actions)}
        if prepared.get("warnings"):
            out["input_warnings"] = list(prepared["warnings"])
        return out

    def example_observation(self) -> dict:
        """An all-black request of the right shape (warm-up, health checks)."""
        size = self.transforms.image_size
        img = np.zeros((size, size, 3), dtype=np.uint8)
        if self.transforms.robot == "libero":
            return {LIBERO_IMAGE: img, LIBERO_WRIST: img, LIBERO_STATE: np.zeros(8), "prompt": "warm up"}
        return {"image": {self.config.image_keys[0]: img},
                "state": np.zeros(self.expected_state_dim() or self.config.action_dim), "prompt": "warm up"}


class ModelPolicy(BasePolicy):
    """Our pi0 / pi0.5 behind openpi's transforms. `noise_seed` makes the flow-matching noise reproducible
    (one draw per request, in arrival order); without it every call draws fresh noise, as openpi does."""

    def __init__(self, model, transforms: Transforms, norm_stats: dict[str, NormStats] | None = None,
                 tokenizer=None, noise_seed: int | None = None, metadata: dict | None = None):
        import torch

        self.model = model.eval()
        self.config = model.config
        self.pre = Preprocessor(model.config, transforms, norm_stats, tokenizer)
        self._generator = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
        self.metadata = dict(metadata or {})

    @property
    def transforms(self) -> Transforms:
        return self.pre.transforms

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prepare(self, obs: dict) -> dict:
        return self.pre.prepare(obs)

    def example_observation(self) -> dict:
        return self.pre.example_observation()

    def _noise(self, n: int, noise):
        import torch

        cfg = self.config
        shape = (cfg.action_horizon, cfg.action_dim)
        if noise is not None:
            noise = torch.as_tensor(np.asarray(noise), dtype=torch.float32)
            return noise[None] if noise.ndim == 2 else noise
        return torch.stack([torch.randn(shape, generator=self._generator) for _ in range(n)])

    def infer(self, obs: dict, *, noise: np.ndarray | None = None) -> dict:
        return self.infer_batch([obs], noise=noise)[0]

    def infer_batch(self, batch: list[dict], *, noise: np.ndarray | None = None) -> list[dict]:
        import torch

        prepared = [self.pre.prepare(o) for o in batch]
        observation = self.pre.to_observation(prepared)
        x0 = self._noise(len(prepared), noise)
        start = time.monotonic()
        with torch.no_grad():
            actions = self.model.sample_actions(observation.to(self.device), noise=x0.to(self.device))
            actions = actions.float().cpu().numpy()
        model_ms = (time.monotonic() - start) * 1000
        results = []
        for p, a in zip(prepared, actions):
            out = self.pre.finish(p, a)
            if not np.isfinite(out["actions"]).all():  # never hand a robot NaN actions
                raise RuntimeError("the model produced non-finite actions for finite inputs (a broken "
                                   "checkpoint, or quantization overflow in --dtype float16)")
            out["policy_timing"] = {"infer_ms": model_ms}
            results.append(out)
        return results

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Run the model once per batch size with zero noise (the seeded noise stream is not consumed)."""
        start = time.monotonic()
        cfg = self.config
        for b in batch_sizes:
            zeros = np.zeros((b, cfg.action_horizon, cfg.action_dim), dtype=np.float32)
            self.infer_batch([self.example_observation()] * b, noise=zeros)
        return time.monotonic() - start


class GenericPolicy(ModelPolicy):
    """Passthrough for any robot: cameras named as the model's (base_0_rgb, left_wrist_0_rgb,
    right_wrist_0_rgb; missing ones are black and masked), the state padded to action_dim, every action dim
    returned."""

    def __init__(self, model, transforms: Transforms | None = None, **kwargs):
        super().__init__(model, transforms or Transforms.generic(model.config.pi05), **kwargs)


# ---- building a policy from a config name or a checkpoint --------------------------------------------------

@dataclass
class PolicySpec:
    """Everything `duquant serve` (and an in-process evaluation) needs to build a policy."""

    config: str | None = None
    checkpoint: str | None = None
    robot: str = "libero"
    device: str = "cpu"  # or "auto" (cuda if available)
    dtype: str = "float32"  # or "auto" (bfloat16 on cuda, float32 on cpu)
    norm_stats: str | None = None
    asset_id: str | None = None
    norm: str = "auto"  # auto | zscore | quantile | none
    delta: str = "auto"  # auto | on | off
    action_dims: int | None = None
    discrete_state_input: bool | None = None
    default_prompt: str | None = None
    tokenizer: str | None = None  # path of paligemma_tokenizer.model, or "fallback"
    noise_seed: int | None = None
    model_seed: int = 0
    quantize: object | None = None  # a duquant.config.DuQuantConfig, or None for float
    calib: str | None = None
    calib_batch_size: int = 2
    state_pad: str = "error"  # error | zero: what a state shorter than the policy expects gets
    extra_metadata: dict = field(default_factory=dict)


def _resolve_tokenizer(spec: PolicySpec, cfg):
    from duquant.models import load_tokenizer

    path = spec.tokenizer
    if path == "fallback":
        path = None
    elif path is None and cfg.llm.vocab_size > 512:
        if PALIGEMMA_TOKENIZER_CACHE.exists():
            path = str(PALIGEMMA_TOKENIZER_CACHE)
        else:
            raise FileNotFoundError(
                f"{cfg.name} uses PaliGemma's {cfg.llm.vocab_size}-token vocabulary: pass --tokenizer "
                f"/path/to/paligemma_tokenizer.model (openpi caches it at {PALIGEMMA_TOKENIZER_CACHE}); "
                "--tokenizer fallback runs a stand-in (smoke tests only: actions are meaningless)")
    return load_tokenizer(path, max_len=cfg.max_token_len, vocab_size=cfg.llm.vocab_size)


def _device_dtype(spec: PolicySpec):
    import torch

    from duquant import workflows as wf

    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = (
        spec.dtype if spec.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    )
    return device, wf.parse_dtype(dtype_name)


def build_preprocessor(spec: PolicySpec, cfg, info=None, log=None) -> Preprocessor:
    """The transforms, norm stats and tokenizer `spec` asks for, for model config `cfg` (`info`: the
    checkpoint's CheckpointInfo, where the norm stats are found)."""
    log = log or (lambda msg: None)
    if spec.robot not in ("libero", "generic"):
        raise ValueError(f"unknown robot {spec.robot!r}; choose libero or generic")
    stats_path = spec.norm_stats or (info.norm_stats if info is not None else None)
    norm_stats = None
    if spec.norm != "none":
        if stats_path is not None:
            norm_stats = load_norm_stats(stats_path)
            log(f"norm stats: {stats_path}")
        elif info is not None:
            raise FileNotFoundError(
                f"no norm stats in {info.path} (looked for assets/<asset_id>/norm_stats.json and LeRobot's "
                "normalizer safetensors); pass --norm-stats FILE, --asset-id ID, or --norm none to serve "
                "unnormalised")
    t = Transforms.for_libero(cfg.pi05) if spec.robot == "libero" else Transforms.generic(cfg.pi05)
    changes: dict = {"image_size": cfg.vision.image_size}
    if spec.norm in ("zscore", "quantile"):
        changes["use_quantiles"] = spec.norm == "quantile"
    if spec.delta in ("on", "off"):
        changes["delta_action_dims"] = 6 if spec.delta == "on" else 0
    if spec.action_dims is not None:
        changes["action_dims"] = spec.action_dims or None
    dsi = cfg.discrete_state_input if spec.discrete_state_input is None else spec.discrete_state_input
    changes["discrete_state_input"] = bool(dsi and cfg.pi05)
    if spec.default_prompt is not None:
        changes["default_prompt"] = spec.default_prompt
    if spec.state_pad not in STATE_PAD_POLICIES:
        raise ValueError(f"unknown state pad policy {spec.state_pad!r}; choose one of {list(STATE_PAD_POLICIES)}")
    changes["state_pad"] = spec.state_pad
    return Preprocessor(cfg, replace(t, **changes), norm_stats, _resolve_tokenizer(spec, cfg))


def spec_config(spec: PolicySpec):
    """(model config, CheckpointInfo or None) without reading any weights."""
    if spec.checkpoint:
        from duquant.models.checkpoints import inspect_checkpoint

        info = inspect_checkpoint(spec.checkpoint, asset_id=spec.asset_id)
        return info.config, info
    from duquant.models.config import get_config

    return get_config(spec.config or "pi0-tiny"), None


def create_policy(spec: PolicySpec, log=None) -> ModelPolicy:
    """Load or build the model, quantize it if asked, and wrap it with the robot's transforms."""
    from duquant import workflows as wf

    log = log or (lambda msg: None)
    device, dtype = _device_dtype(spec)
    info = None
    if spec.checkpoint:
        from duquant.models.checkpoints import load_checkpoint_with_info

        model, info = load_checkpoint_with_info(
            spec.checkpoint, config=spec.config, device=device, dtype=dtype, asset_id=spec.asset_id
        )
        log(info.describe())
    else:
        model = wf.load_model(
            spec.config or wf.DEFAULT_CONFIG, device=device, dtype=dtype, seed=spec.model_seed
        )
        log(f"built-in {model.config.name} (seeded random weights, seed {spec.model_seed})")
    cfg = model.config
    pre = build_preprocessor(spec, cfg, info, log)
    quant_meta = _quantize(model, spec, log) if spec.quantize is not None else None
    metadata = {"duquant": {"model": cfg.name, "pi05": cfg.pi05, "action_horizon": cfg.action_horizon,
                            "action_dim": cfg.action_dim, "robot": pre.transforms.robot,
                            "checkpoint": spec.checkpoint, "quantization": quant_meta, **spec.extra_metadata}}
    cls = ModelPolicy if pre.transforms.robot == "libero" else GenericPolicy
    return cls(model, pre.transforms, norm_stats=pre.norm_stats, tokenizer=pre.tokenizer,
               noise_seed=spec.noise_seed, metadata=metadata)


def logged_calibration(batches: list, log, every_s: float = 5.0):
    """`workflows.calibration_fn` over `batches` (same noise seeds, so the same statistics), logging progress:
    the first batch, then at most every `every_s` seconds, then the last."""
    from duquant import workflows as wf

    def run(model) -> None:
        start = last = time.monotonic()
        log(f"calibration: {len(batches)} batches")
        for i, obs in enumerate(batches):
            wf.calibration_fn([obs], progress=False, seed=1234 + i)(model)
            now = time.monotonic()
            if i == 0 or i == len(batches) - 1 or now - last >= every_s:
                last = now
                rate = (now - start) / (i + 1)
                log(f"calibration: batch {i + 1}/{len(batches)}, {now - start:.1f} s elapsed, "
                    f"about {rate * (len(batches) - i - 1):.0f} s left")

    return run


def _quantize(model, spec: PolicySpec, log) -> dict:
    from duquant import workflows as wf
    from duquant.api import quantize

    qcfg = spec.quantize
    if qcfg.packdir is None:
        qcfg = qcfg.replace(packdir=wf.default_packdir(model.config.name.replace("[", "_").replace("]", "")
                                                       .replace("+", "_"), qcfg))
    if spec.calib:
        calib = wf.load_calibration_file(spec.calib, spec.calib_batch_size)
        source = spec.calib
        if len(calib) < qcfg.calib_steps:
            logger.warning("calibration file %s holds %d observations (%d batches of %d), fewer than "
                           "--calib-steps %d: calibrating on those %d batches", spec.calib,
                           sum(o.batch_size for o in calib), len(calib), spec.calib_batch_size,
                           qcfg.calib_steps, len(calib))
    else:
        calib = wf.synthetic_observations(model, qcfg.calib_steps, spec.calib_batch_size, seed=0)
        source = "synthetic"
    mixed = f" + {len(qcfg.format_overrides)} per-layer format override(s)" if qcfg.format_overrides else ""
    log(f"quantizing ({qcfg.method} {qcfg.format_name}{mixed}, calibration: {source}, packs: {qcfg.packdir})")
    report = quantize(model, qcfg, calibrate=logged_calibration(calib[: qcfg.calib_steps], log), progress=False)
    if not report.dryrun:
        log(f"quantized {report.num_layers} layers in {report.calibration_seconds + report.quantization_seconds:.1f} s "
            f"(packs: {report.pack_hits} reused, {report.pack_misses} computed)")
    if report.dryrun:
        return {"dryrun": True, "lines": list(report.lines)}
    return {
        "method": qcfg.method,
        "bits": qcfg.format_name,  # the global format (w4a8, w8a8-fp8, ...); per-layer ones in "formats"
        "formats": report.format_counts(),
        "preset": qcfg.preset,
        "layers": report.num_layers,
        "packdir": qcfg.packdir,
        "calibration": source,
        "backend": qcfg.backend,
        "pack_hits": report.pack_hits,
        "config": qcfg.to_dict(),
    }


__all__ = [
    "BasePolicy",
    "ModelPolicy",
    "Preprocessor",
    "build_preprocessor",
    "spec_config",
    "GenericPolicy",
    "Transforms",
    "NormStats",
    "load_norm_stats",
    "save_norm_stats",
    "normalize",
    "unnormalize",
    "PolicySpec",
    "create_policy",
    "libero_inputs",
    "generic_inputs",
    "parse_image",
]
