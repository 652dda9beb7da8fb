"""One CUDA graph per `sample_actions` call: the whole prefix pass and every denoising step replay as a single
launch, so no kernel waits on the host.

Capture needs every tensor the call reads to live at a fixed address: the observation and the noise are copied
into static buffers before each replay, and the actions are read from the graph's static output. A call whose
inputs differ in structure, shape or dtype from the captured ones is refused (capture another CapturedPolicy
for it). When capture fails, `GraphCaptureError` says why; nothing falls back to eager execution.
"""

from __future__ import annotations

import torch
from torch import nn

from duquant.models.observation import Observation


class GraphCaptureError(RuntimeError):
    """`sample_actions` could not be captured in a CUDA graph (the message names the cause)."""


def _layout(obs: Observation) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in obs.named_tensors())


class CapturedPolicy:
    """`policy.sample_actions` for observations laid out like `example` (same cameras, shapes, dtypes), replayed
    from one CUDA graph. `warmup` eager calls run first on a side stream (compilation, autotuning, allocator)."""

    def __init__(self, policy: nn.Module, example: Observation, num_steps: int | None = None, warmup: int = 2):
        if not torch.cuda.is_available() or policy.device.type != "cuda":
            raise GraphCaptureError(f"CUDA graphs need the policy on a CUDA device (it is on {policy.device})")
        self.policy, self.num_steps = policy, num_steps
        device = policy.device
        cfg = policy.config
        self.layout = _layout(example)
        self.static_obs = example.map(lambda t: t.to(device, copy=True))  # buffers of its own, at fixed addresses
        shape = (example.batch_size, cfg.action_horizon, cfg.action_dim)
        self.static_noise = torch.zeros(shape, dtype=torch.float32, device=device)
        self.graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            with torch.cuda.graph(self.graph):
                self.static_actions = self._run()
            torch.cuda.synchronize()
        except Exception as err:  # what capture refuses: a host sync, a host->device copy, a CPU tensor ...
            raise GraphCaptureError(f"sample_actions could not be captured in a CUDA graph: "
                                    f"{type(err).__name__}: {err}") from err

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        return self.policy.sample_actions(self.static_obs, noise=self.static_noise, num_steps=self.num_steps)

    def replay(self) -> torch.Tensor:
        """Run the graph on what the static buffers hold now (for timing); returns the static output."""
        self.graph.replay()
        return self.static_actions

    def __call__(self, observation: Observation, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Actions (B, horizon, action_dim) float32, as `policy.sample_actions(observation, noise)` gives them."""
        if _layout(observation) != self.layout:
            raise ValueError("this CapturedPolicy was captured for observations laid out as "
                             f"{self.layout}; got {_layout(observation)}: capture another one for that layout")
        for (_, dst), (_, src) in zip(self.static_obs.named_tensors(), observation.named_tensors()):
            dst.copy_(src, non_blocking=True)
        if noise is None:
            noise = torch.randn(self.static_noise.shape, generator=generator, device=self.static_noise.device
                                if generator is None else generator.device)
        if tuple(noise.shape) != tuple(self.static_noise.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(self.static_noise.shape)}")
        self.static_noise.copy_(noise, non_blocking=True)
        self.graph.replay()
        return self.static_actions.clone()
