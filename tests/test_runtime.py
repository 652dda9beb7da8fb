"""The fast inference path's CPU-checkable contracts: `sample_actions` is graph-capturable (no host<->device
traffic once its inputs are on the model's device), fused projections keep names and numerics, and the CUDA-graph
runner refuses what it cannot run (its GPU tests are in tests/test_runtime_gpu.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from duquant.models import build_policy, make_synthetic_observation
from duquant.runtime import CapturedPolicy, GraphCaptureError, fuse_projections

HOST_DATA_FACTORIES = {"tensor", "as_tensor", "asarray", "from_numpy", "frombuffer"}
SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}



class _FunctionWatch(TorchFunctionMode):
    """Tensors built from host data (torch.tensor(list, device=...) is a host->device copy on CUDA)."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_DATA_FACTORIES:
            self.events.append(f"torch.{func.__name__} (host data -> device)")
        return func(*args, **(kwargs or {}))


class _DispatchWatch(TorchDispatchMode):
    """Copies between the host and the device, and reads of device values on the host (.item(), bool())."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            self.events.append(f"{func} (device -> host sync)")
        ins = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        target = kwargs.get("device")
        if target is not None and ins and {torch.device(target).type} != ins:  # .to(other device), before it fails
            self.events.append(f"{func} ({sorted(ins)} -> {torch.device(target).type})")
        out = func(*args, **kwargs)
        outs = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        if ("cpu" in ins and "meta" in outs) or ("meta" in ins and "cpu" in outs):
            self.events.append(f"{func} ({sorted(ins)} -> {sorted(outs)})")
        return out


def _traffic(fn) -> list[str]:
    events: list[str] = []
    with _FunctionWatch(events), _DispatchWatch(events):
        try:
            fn()
        except (NotImplementedError, RuntimeError):  # reading meta values fails; the watch recorded the attempt
            events.append("read of device values")
    return events


@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_sample_actions_has_no_host_device_traffic(name):
    """The meta device stands in for the GPU: any copy from the host, or any read back, shows up as an event."""
    model = build_policy(name, device="meta")
    obs = make_synthetic_observation(model.config, batch_size=2, seed=0).to("meta")
    noise = torch.empty(2, model.config.action_horizon, model.config.action_dim, device="meta")
    events = _traffic(lambda: model.sample_actions(obs, noise=noise))
    assert events == []


def test_the_traffic_watch_sees_what_capture_refuses():
    x = torch.empty(3, device="meta")
    assert _traffic(lambda: torch.tensor([1.0, 2.0], device="meta"))
    assert _traffic(lambda: torch.zeros(3).to("meta"))
    assert _traffic(lambda: x.cpu())
    assert _traffic(lambda: bool(x.sum() > 0))
    assert not _traffic(lambda: torch.full((3,), 0.5, device="meta") + x)


@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_fused_projections_keep_names_memory_and_actions(name):
    model = build_policy(name, seed=0)
    obs = make_synthetic_observation(model.config, batch_size=2, seed=1)
    noise = torch.randn(2, model.config.action_horizon, model.config.action_dim,
                        generator=torch.Generator().manual_seed(0))
    ref = model.sample_actions(obs, noise=noise)
    fused = copy.deepcopy(model)
    n = fuse_projections(fused)
    cfg = model.config
    assert n == 2 * (cfg.llm.depth + cfg.expert.depth) + cfg.vision.depth  # qkv + gate/up per Gemma layer, qkv SigLIP
    assert set(fused.state_dict()) == set(model.state_dict())
    attn = fused.paligemma_with_expert.paligemma.model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # a view, not a copy
    torch.testing.assert_close(fused.sample_actions(obs, noise=noise), ref, rtol=0, atol=1e-5)
    # The fused matrix is what runs: changing it changes the actions.
    with torch.no_grad():
        attn.qkv_weight.mul_(0.5)
    assert not torch.allclose(fused.sample_actions(obs, noise=noise), ref, atol=1e-4)


def test_fusion_leaves_quantized_groups_alone():
    from duquant import DuQuantConfig, quantize

    model = build_policy("pi0-tiny", seed=0)
    obs = make_synthetic_observation(model.config, batch_size=1, seed=0)
    cfg = DuQuantConfig(method="rtn", scope="paligemma_with_expert.gemma_expert.")
    quantize(model, cfg, calibrate=lambda m: m.sample_actions(obs))
    expert_layer = model.paligemma_with_expert.gemma_expert.model.layers[0]
    n = fuse_projections(model)
    assert expert_layer.self_attn.qkv_weight is None and expert_layer.mlp.gate_up_weight is None
    assert n == 2 * model.config.llm.depth + model.config.vision.depth


def test_capture_refuses_a_cpu_policy():
    model = build_policy("pi0-tiny")
    with pytest.raises(GraphCaptureError, match="CUDA"):
        CapturedPolicy(model, make_synthetic_observation(model.config))
