"""The engine on a generic model: quantize(), groups, packs, dry run, apply_from_env, baselines' ordering."""

import json

import pytest
import torch
from torch import nn

import duquant
from duquant.api import apply_from_env, quantize
from duquant.config import DuQuantConfig
from duquant.layers import DuQuantLinear
from duquant.packs import PackError, PackStore


class Block(nn.Module):
    """A pre-norm transformer-ish block: q/k/v share their input, gate/up share theirs."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d // 2), nn.Linear(d, d // 2)
        self.o_proj = nn.Linear(d, d)
        self.gate_proj, self.up_proj = nn.Linear(d, h), nn.Linear(d, h)
        self.down_proj = nn.Linear(h, d)

        # RMSNorm gains with a few large channels: the massive activations of real LLMs show up in the inputs
        # of q/k/v and gate/up exactly like this.
        self.register_buffer("norm1", torch.ones(d))
        self.register_buffer("norm2", torch.ones(d))

    def forward(self, x):
        h = torch.nn.functional.rms_norm(x, (x.shape[-1],)) * self.norm1
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        a = torch.cat([k * v.sigmoid(), v], -1) * q.tanh()
        x = x + self.o_proj(a)
        h = torch.nn.functional.rms_norm(x, (x.shape[-1],)) * self.norm2
        return x + self.down_proj(torch.nn.functional.gelu(self.gate_proj(h)) * self.up_proj(h))


class Toy(nn.Module):
    def __init__(self, d=64, h=128, n=2, outlier_channels=(3, 17), outlier_scale=40.0):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, h) for _ in range(n))
        self.head = nn.Linear(d, 8)
        for layer in self.layers:
            layer.norm1[list(outlier_channels)] = outlier_scale
            layer.norm2[list(outlier_channels)] = outlier_scale / 2

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Toy(**kw).eval()
    with torch.no_grad():  # Gaussian weights, like trained ones (nn.Linear's init is uniform)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
    return model


def batches(n=4, seed=1, d=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, d, generator=g) for _ in range(n)]


def calib_fn(data):
    def run(m):
        for x in data:
            m(x)
    return run


def rel_err(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


CFG = DuQuantConfig(scope="layers.", block_size=16, rotation_steps=32)


def test_quantize_replaces_selected_layers_and_keeps_output_close():
    model = make_model()
    x = batches(1, seed=9)[0]
    ref = model(x).detach()
    report = quantize(model, CFG, calibrate=calib_fn(batches()), progress=False, verbose=False)
    assert report.num_layers == 14 and report.total_linear == 15
    assert isinstance(model.layers[0].q_proj, DuQuantLinear) and isinstance(model.head, nn.Linear)
    out = model(x).detach()
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 0.2
    # q/k/v and gate/up were fed the same tensor, so they share one transform object
    assert model.layers[0].q_proj.transform is model.layers[0].k_proj.transform is model.layers[0].v_proj.transform
    assert model.layers[0].gate_proj.transform is model.layers[0].up_proj.transform
    assert model.layers[0].o_proj.transform is not model.layers[0].q_proj.transform
    assert report.bytes_after < 0.3 * report.bytes_before


def _layer_output_error(method, wbits=4, abits=8):
    model = make_model()
    data = batches()
    held_out = batches(2, seed=7)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0]))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for x in held_out:
        model(x)
    for h in hooks:
        h.remove()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}
    cfg = CFG.replace(method=method, wbits=wbits, abits=abits)
    quantize(model, cfg, calibrate=calib_fn(data), progress=False, verbose=False)
    errs = []
    for n, f in originals.items():
        x = torch.cat(inputs[n])
        errs.append(rel_err(model.get_submodule(n)(x).detach(), f(x).detach()))
    return sum(errs) / len(errs)


def test_duquant_beats_baselines_on_outlier_activations():
    errs = {m: _layer_output_error(m) for m in ("rtn", "smoothquant", "hadamard", "duquant")}
    assert errs["duquant"] < min(errs["smoothquant"], errs["rtn"], errs["hadamard"]), errs


def test_packs_reused_bit_identical_and_stale_detected(tmp_path):
    cfg = CFG.replace(packdir=str(tmp_path / "packs"))
    m1 = make_model()
    r1 = quantize(m1, cfg, calibrate=calib_fn(batches()), progress=False, verbose=False)
    assert (r1.pack_hits, r1.pack_misses) == (0, 14)
    from duquant.packs import FORMAT_VERSION

    entries = json.loads((tmp_path / "packs" / "manifest.json").read_text())["layers"]
    assert len(entries) == 14 and {e["pack_format_version"] for e in entries.values()} == {FORMAT_VERSION}

    called = []
    m2 = make_model()
    r2 = quantize(m2, cfg, calibrate=lambda m: called.append(1), progress=False, verbose=False)
    assert (r2.pack_hits, r2.pack_misses) == (14, 0) and not called  # no calibration on a full hit
    for (n, a), (_, b) in zip(m1.named_modules(), m2.named_modules()):
        if isinstance(a, DuQuantLinear):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.w_scale, b.w_scale), n
    x = batches(1, seed=3)[0]
    assert torch.equal(m1(x), m2(x))

    # a different config recomputes (stale), different weights too
    m3 = make_model()
    r3 = quantize(m3, cfg.replace(alpha=0.3), calibrate=calib_fn(batches()), progress=False, verbose=False)
    assert r3.pack_misses == 14 and r3.stale and "config changed" in r3.stale[0][1]
    m4 = make_model(seed=5)
    r4 = quantize(m4, cfg.replace(alpha=0.3), calibrate=calib_fn(batches()), progress=False, verbose=False)
    assert r4.pack_misses == 14 and any("weights changed" in why for _, why in r4.stale)


def test_corrupt_pack_is_rejected(tmp_path):
    cfg = CFG.replace(packdir=str(tmp_path))
    quantize(make_model(), cfg, calibrate=calib_fn(batches()), progress=False, verbose=False)
    store = PackStore(tmp_path)
    victim = store.path("layers.0.down_proj")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(PackError, match="corrupt or truncated"):
        quantize(make_model(), cfg, calibrate=calib_fn(batches()), progress=False, verbose=False)
    # flipped byte in the tensor data: checksum mismatch
    corrupted = bytearray(data)
    corrupted[-5] ^= 0xFF
    victim.write_bytes(bytes(corrupted))
    with pytest.raises(PackError, match="checksum mismatch"):
        quantize(make_model(), cfg, calibrate=calib_fn(batches()), progress=False, verbose=False)
    assert not list(tmp_path.glob("*.tmp"))


def test_dryrun_changes_nothing():
    model = make_model()
    report = quantize(model, CFG.replace(dryrun=True), progress=False, verbose=False)
    assert report.dryrun and len(report.lines) == 14
    assert ("layers.0.q_proj: 64\u219264, w4a8 (int4 weights, int8 activations), duquant, block 16, "
            "permute zigzag") in report.lines
    assert not any(isinstance(m, DuQuantLinear) for m in model.modules())


def test_apply_from_env(capsys):
    model = make_model()
    assert apply_from_env(model, environ={}) is None
    env = {"OPENPI_DUQUANT_SCOPE": "layers.1.", "OPENPI_DUQUANT_BLOCK": "16", "OPENPI_DUQUANT_STEPS": "8"}
    report = apply_from_env(model, calibrate=calib_fn(batches(2)), environ=env)
    assert report.num_layers == 7
    assert isinstance(model.layers[1].down_proj, DuQuantLinear) and isinstance(model.layers[0].down_proj, nn.Linear)
    dry = apply_from_env(make_model(), environ={**env, "OPENPI_DUQUANT_DRYRUN": "1"})
    assert dry.dryrun and "Matched Linear layers: 7" in capsys.readouterr().out


def test_methods_needing_activations_refuse_to_run_without_calibration(tmp_path):
    for method in ("duquant", "smoothquant"):
        model = make_model()
        with pytest.raises(ValueError, match=f"method '{method}' needs activation statistics.*pass calibrate=fn"):
            quantize(model, CFG.replace(method=method), progress=False, verbose=False)
        assert not any(isinstance(m, DuQuantLinear) for m in model.modules())  # nothing half-applied
    with pytest.raises(ValueError, match="act_static / act_pct needs activation statistics"):
        quantize(make_model(), CFG.replace(method="rtn", act_static=True), progress=False, verbose=False)
    quantize(make_model(), CFG.replace(method="hadamard"), progress=False, verbose=False)  # weight-only methods run
    # packs from a calibrated run are enough: no calibration is needed to load them
    cfg = CFG.replace(packdir=str(tmp_path))
    quantize(make_model(), cfg, calibrate=calib_fn(batches()), progress=False, verbose=False)
    assert quantize(make_model(), cfg, progress=False, verbose=False).pack_hits == 14


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = make_model()
    ref = model(batches(1, seed=2)[0]).detach()
    model = model.to(dtype)
    quantize(model, CFG, calibrate=calib_fn([b.to(dtype) for b in batches(2)]), progress=False, verbose=False)
    out = model(batches(1, seed=2)[0].to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.detach().float(), ref) < 0.25


def test_public_surface():
    assert duquant.quantize is quantize and duquant.DuQuantLinear is DuQuantLinear
    assert duquant.__version__
