"""pi0 / pi0.5 glue shared by the CLI, the report and the server: build or load the policy, observations for
calibration and evaluation, and the calibration function the engine calls.

The engine (``duquant.api``) is model-agnostic; this module is where it meets our policy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

DEFAULT_CONFIG = "pi0-tiny"


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def load_model(config: str | None = None, checkpoint: str | os.PathLike | None = None, *, device: str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The built-in model by name (seeded weights), or a user's checkpoint directory/file."""
    from duquant import models

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist; pass a directory holding model.safetensors "
                                    "(openpi or LeRobot layout) or the file itself")
        return models.load_policy(path, config=config, device=device, dtype=dtype)
    return models.build_policy(config or DEFAULT_CONFIG, device=device, dtype=dtype, seed=seed)


def synthetic_observations(model: nn.Module, count: int, batch_size: int, seed: int) -> list:
    from duquant.models import make_synthetic_observation

    return [make_synthetic_observation(model.config, batch_size=batch_size, seed=seed + i) for i in range(count)]


def load_calibration_file(path: str | os.PathLike, batch_size: int) -> list:
    """Observations recorded to a file (see docs/report.md for the format), split into batches."""
    from duquant.models.observation import Observation, load_observations

    obs = load_observations(path)
    if isinstance(obs, list):
        obs = Observation.concat(obs) if len(obs) > 1 else obs[0]
    n = obs.batch_size
    return [obs.select(list(range(i, min(n, i + batch_size)))) for i in range(0, n, batch_size)]


def fixed_noise(model: nn.Module, batch_size: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch_size, cfg.action_horizon, cfg.action_dim, generator=g)
    return noise.to(device=device, dtype=dtype)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()), None)
    if p is None:
        b = next(iter(model.buffers()))
        return b.device, torch.float32
    return p.device, p.dtype


def calibration_fn(observations: list, steps: int | None = None, progress: bool = True, seed: int = 1234
                   ) -> Callable[[nn.Module], None]:
    """A `calibrate(model)` running full `sample_actions` passes (prefix + every denoising step) over the
    observations, so the action expert is calibrated on the timesteps it sees at inference."""
    batches = observations[:steps] if steps else observations

    def run(model: nn.Module) -> None:
        from tqdm.auto import tqdm

        device, dtype = _model_device_dtype(model)
        for i, obs in enumerate(tqdm(batches, desc="calibrate", disable=not progress, leave=False)):
            obs = obs.to(device)
            noise = fixed_noise(model, obs.batch_size, seed + i, device=device, dtype=torch.float32)
            model.sample_actions(obs, noise=noise)

    return run


@torch.no_grad()
def sample_actions(model: nn.Module, observations: list, seed: int = 4321) -> torch.Tensor:
    """Actions for every observation batch, with the flow-matching noise fixed by `seed` (exact comparisons)."""
    device, _ = _model_device_dtype(model)
    out = []
    for i, obs in enumerate(observations):
        obs = obs.to(device)
        noise = fixed_noise(model, obs.batch_size, seed + i, device=device)
        out.append(model.sample_actions(obs, noise=noise).float().cpu())
    return torch.cat(out)


def max_abs_error(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return float((pred.double() - ref.double()).abs().max())


def default_packdir(config_name: str, cfg) -> str:
    """`duquant_packs/<model>-<method>-<format>-<hash>`; per-layer formats give their own directory (a pack's key
    already holds its layer's format: this only keeps differently mixed runs from recomputing each other's)."""
    tag = cfg.layer_hash("")
    if cfg.format_overrides:
        import hashlib
        import json

        tag = hashlib.sha256(json.dumps([tag, cfg.to_dict()["format_overrides"]]).encode()).hexdigest()
    return str(Path("duquant_packs") / f"{config_name}-{cfg.method}-{cfg.format_name}-{tag[:10]}")

