"""Whole-call CUDA-graph capture of `sample_actions` for every variant (pi0 / pi0.5; bf16, W4A8, W8A8; batch 1
and 16), replaying to the eager result; and the fast path (fused + compiled + captured) against the plain model.
GPU only: skipped on CI. The CPU guard against the cause of capture failures is in tests/test_runtime.py."""

from __future__ import annotations

import copy

import pytest
import torch

from duquant.models import build_policy, make_synthetic_observation

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def _quantized(model, wbits: int, obs):
    from duquant import DuQuantConfig, kernels, quantize

    if not kernels.gpu_available()[0]:
        pytest.skip(kernels.gpu_available()[1])
    cfg = DuQuantConfig(method="duquant", wbits=wbits, abits=8, backend="gpu", scope="paligemma_with_expert.")
    quantize(model, cfg, calibrate=lambda m: m.sample_actions(obs))
    kernels.prepare_gpu_model(model)
    return model


@pytest.fixture(scope="module", params=["pi0-tiny", "pi05-tiny"])
def base(request):
    return build_policy(request.param, device="cuda", dtype=torch.bfloat16, seed=0)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("variant", ["bf16", "w4a8", "w8a8"])
def test_whole_call_capture_replays_the_eager_result(base, variant, batch):
    from duquant.runtime import CapturedPolicy

    obs = make_synthetic_observation(base.config, batch_size=batch, seed=1).to("cuda")
    model = base if variant == "bf16" else _quantized(copy.deepcopy(base), int(variant[1]), obs)
    noise = torch.randn(batch, base.config.action_horizon, base.config.action_dim, device="cuda")
    eager = model.sample_actions(obs, noise=noise)
    captured = CapturedPolicy(model, obs)
    replayed = captured(obs, noise)
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)  # the same kernels on the same inputs
    other = make_synthetic_observation(base.config, batch_size=batch, seed=2).to("cuda")
    torch.testing.assert_close(captured(other, noise), model.sample_actions(other, noise=noise), rtol=0, atol=0)


def test_fast_path_matches_the_plain_model(base):
    from duquant.runtime import optimize

    obs = make_synthetic_observation(base.config, batch_size=2, seed=1).to("cuda")
    noise = torch.randn(2, base.config.action_horizon, base.config.action_dim, device="cuda")
    plain = copy.deepcopy(base)
    eager = plain.sample_actions(obs, noise=noise)
    fast = optimize(copy.deepcopy(base), obs)(obs, noise)
    err = ((fast - eager).norm() / eager.norm()).item()
    assert err < 0.05, err  # bf16: fusion and compilation reassociate sums (docs/gpu.md states the tolerance)
