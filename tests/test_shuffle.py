"""permute=shuffle: the permutation's definition, the transform built with it (exact, falls back to zigzag where the
width does not allow it, and says so), its config spellings, pack keys and pack round trip, and the report rows."""

import argparse

import pytest
import torch
from torch import nn

from duquant import registry
from duquant.api import quantize
from duquant.config import ConfigError, DuQuantConfig, add_cli_args, from_args
from duquant.selection import layer_line, select_layers, selection_summary
from duquant.transform import (
    LayerTransform,
    build_transform,
    is_shuffle_permutation,
    shuffle_permutation,
    shuffle_unsupported,
)

SUPPORTED = [(128, 128), (256, 128), (1024, 128), (2048, 128), (4096, 128), (16384, 128), (64, 16), (256, 16)]
UNSUPPORTED = [(1152, 128), (4304, 128), (640, 128), (344, 128), (32, 128), (32768, 128)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- the permutation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("c,bs", SUPPORTED)
def test_shuffle_permutation_is_balanced_and_matches_a_block_transpose(c, bs):
    perm = shuffle_permutation(c, bs)
    nb, g = c // bs, bs // (c // bs)
    assert perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(c))
    for j in range(nb):  # every new block takes exactly g channels from every old block, one contiguous chunk
        src = perm[j * bs:(j + 1) * bs]
        assert torch.equal(torch.bincount(src // bs, minlength=nb), torch.full((nb,), g))
        assert torch.equal(src % bs // g, torch.full((bs,), j))
    # the same thing as tensor ops: the token as [old block, chunk, g] with the first two axes swapped
    ref = torch.arange(c).reshape(nb, nb, g).transpose(0, 1).reshape(-1)
    assert torch.equal(perm, ref)


def test_shuffle_permutation_at_16384_is_the_transpose_of_a_128_grid():
    grid = [[b * 128 + p for p in range(128)] for b in range(128)]  # grid[b][p] = channel p of block b
    transposed = [grid[b][j] for j in range(128) for b in range(128)]  # new block j lists position j of each block
    assert shuffle_permutation(16384, 128).tolist() == transposed


@pytest.mark.parametrize("c,bs", UNSUPPORTED)
def test_shuffle_refuses_widths_it_cannot_take(c, bs):
    why = shuffle_unsupported(c, bs)
    assert why is not None and str(c) in why
    with pytest.raises(ValueError, match="use zigzag"):
        shuffle_permutation(c, bs)
    assert registry.permutation_fallback("shuffle", c, bs) == ("zigzag", why)


def test_shuffle_unsupported_names_the_reason():
    assert shuffle_unsupported(1152, 128) == "1152 channels are 9 blocks of 128, and 9 does not divide 128"
    assert shuffle_unsupported(4304, 128) == "4304 channels are not whole 128-wide blocks"
    assert all(shuffle_unsupported(c, bs) is None for c, bs in SUPPORTED)


# ---- the transform -------------------------------------------------------------------------------------------

def outliers(t, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=g, dtype=torch.float64)
    x[:, [3, 77 % c, c - 5]] *= torch.tensor([40.0, 20.0, 60.0], dtype=torch.float64)
    return x, torch.randn(48, c, generator=g, dtype=torch.float64)


def build(x, w, permute, bs=128, weight_only=False, seed=1):
    flat = x.float()
    return build_transform("duquant", weight=w.float(), act_absmax=flat.abs().amax(0),
                           act_sample=None if weight_only else flat, block_size=bs, steps=16, permute=permute,
                           seed=seed)


@pytest.mark.parametrize("c,bs", [(1024, 128), (256, 128), (128, 128), (256, 16)])
@pytest.mark.parametrize("weight_only", [False, True])
def test_shuffle_transform_keeps_the_function_and_uses_the_shuffle(c, bs, weight_only):
    x, w = outliers(200, c)
    t = build(x, w, "shuffle", bs, weight_only)
    t.validate(check_values=True)
    assert t.permutation == "shuffle" and is_shuffle_permutation(t)
    assert torch.equal(t.perm, shuffle_permutation(c, bs))
    assert t._shared("rot1", t.rot1)  # sigma reorders every block's columns alike: R1 stays one shared matrix
    ref = x @ w.T
    assert float((t.apply(x) @ t.fold_into_weight(w).T - ref).abs().max() / ref.abs().max()) < 1e-5


def test_shuffle_r1_columns_are_dealt_by_magnitude_in_snake_order():
    """After smoothing and the reordered R1, position q of a block belongs to chunk q // g, and the chunks hold
    the magnitude ranks a snake deal gives: ranks 0, 2nb-1, 2nb, ... in chunk 0, largest first."""
    c, bs = 1024, 128
    nb, g = c // bs, bs // (c // bs)
    x, w = outliers(300, c)
    t = build(x, w, "shuffle", bs)
    z = LayerTransform(c, bs, smooth=t.smooth, rot1=t.rot1).apply(x.float())
    m = z.abs().reshape(-1, nb, bs).amax(dim=(0, 1))
    rank = torch.empty(bs, dtype=torch.long)
    rank[torch.argsort(m, descending=True, stable=True)] = torch.arange(bs)
    for q in range(bs):
        r = int(rank[q])
        chunk = r % nb if (r // nb) % 2 == 0 else nb - 1 - r % nb
        assert chunk == q // g
    assert all(bool((rank[k * g:(k + 1) * g].diff() > 0).all()) for k in range(nb))  # largest first per chunk


def test_shuffle_reduces_to_the_same_r1_and_seeded_stream_as_zigzag():
    x, w = outliers(200, 1024)
    s, z = build(x, w, "shuffle"), build(x, w, "zigzag")
    assert torch.equal(s.smooth, z.smooth)
    assert not torch.equal(s.perm, z.perm) and z.permutation == "zigzag"
    # R1 is zigzag's with its columns reordered: the same set of columns in every block
    assert torch.equal(s.rot1[0].T.sort(dim=0).values, z.rot1[0].T.sort(dim=0).values)


def test_width_without_shuffle_falls_back_to_zigzag_and_records_it():
    x, w = outliers(200, 1152)
    s, z = build(x, w, "shuffle"), build(x, w, "zigzag")
    assert s.permutation == "zigzag" and not is_shuffle_permutation(s)
    assert all(torch.equal(a, b) for a, b in zip(s.to_tensors().values(), z.to_tensors().values()))
    ref = x @ w.T
    assert float((s.apply(x) @ s.fold_into_weight(w).T - ref).abs().max() / ref.abs().max()) < 1e-5


def test_none_keeps_r1_only_and_bools_still_work():
    x, w = outliers(100, 256)
    assert build(x, w, "none").perm is None and build(x, w, False).permutation == "none"
    assert build(x, w, True).permutation == "zigzag"
    with pytest.raises(ValueError, match="use one of zigzag, shuffle, none"):
        build(x, w, "transpose")


def test_pack_tensors_round_trip_the_permutation():
    x, w = outliers(100, 256)
    for permute in ("shuffle", "zigzag", "none"):
        t = build(x, w, permute)
        d = t.to_tensors("transform.")
        back = LayerTransform.from_tensors(d, "transform.", in_features=256, block_size=128, kind="duquant",
                                           permutation=t.permutation)
        assert back.permutation == t.permutation and torch.equal(back.apply(x), t.apply(x))
        # packs written before the permutation was recorded: read from the perm tensor itself
        old = LayerTransform.from_tensors(d, "transform.", in_features=256, block_size=128, kind="duquant")
        assert old.permutation == permute


# ---- config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,name", [("shuffle", "shuffle"), ("SHUFFLE", "shuffle"), ("zigzag", "zigzag"),
                                        ("1", "zigzag"), ("true", "zigzag"), ("on", "zigzag"), ("0", "none"),
                                        ("false", "none"), ("off", "none"), ("none", "none")])
def test_permute_from_environment_and_cli(value, name):
    assert DuQuantConfig.from_env({"OPENPI_DUQUANT_PERMUTE": value}).permute == name
    p = argparse.ArgumentParser()
    add_cli_args(p)
    assert from_args(p.parse_args(["--permute", value]), environ={}).permute == name


def test_permute_python_bools_and_bad_values():
    assert DuQuantConfig().permute == "zigzag"
    assert DuQuantConfig(permute=True).permute == "zigzag" and DuQuantConfig(permute=False).permute == "none"
    assert DuQuantConfig.from_dict({**DuQuantConfig().to_dict(), "permute": True}).permute == "zigzag"
    with pytest.raises(ConfigError, match="OPENPI_DUQUANT_PERMUTE: unknown permutation 'sideways'; use one of "
                                          "zigzag, shuffle, none"):
        DuQuantConfig.from_env({"OPENPI_DUQUANT_PERMUTE": "sideways"})
    with pytest.raises(ConfigError, match="unknown permutation 'bogus'"):
        DuQuantConfig(permute="bogus")
    p = argparse.ArgumentParser()
    add_cli_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--permute", "sideways"])


def test_pack_keys_tell_the_permutations_apart_and_keep_old_keys():
    keys = {p: DuQuantConfig(permute=p).layer_hash("m.layers.0.mlp.down_proj") for p in ("zigzag", "shuffle", "none")}
    assert len(set(keys.values())) == 3
    # the keys the previous release (permute a bool) computed: packs written by it are still reused
    assert DuQuantConfig().layer_hash("x.q_proj") == "4f828fdba824b7ff"
    assert DuQuantConfig(permute="none").layer_hash("x.q_proj") == "11d9084ac6995b13"


# ---- selection, quantize and report ------------------------------------------------------------------------

class TwoWidths(nn.Module):
    """fc1 takes 256 channels (shuffle applies), fc2 1152 (9 blocks of 128: zigzag)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 1152)
        self.fc2 = nn.Linear(1152, 256)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def calibrate(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(32, 256, generator=g)
            x[:, 7] *= 30
            model(x)


CFG = DuQuantConfig(permute="shuffle", rotation_steps=8)
FALLBACK = "1 layer got zigzag instead of shuffle: 1152 channels are 9 blocks of 128, and 9 does not divide 128"


def test_selection_says_which_layers_fall_back():
    model = TwoWidths()
    sel = select_layers(model, CFG)
    assert layer_line("fc1", model.fc1, CFG).endswith(", duquant, block 128, permute shuffle")
    assert layer_line("fc2", model.fc2, CFG).endswith(
        ", duquant, block 128, permute zigzag (shuffle: 1152 channels are 9 blocks of 128, and 9 does not divide 128)")
    assert f"[duquant] permutation: shuffle x1, zigzag x1 ({FALLBACK})" in selection_summary(model, sel, CFG)
    assert "permutation" not in selection_summary(model, sel, CFG.replace(method="hadamard"))


def test_quantize_records_the_permutation_and_packs_keep_it(tmp_path):
    model = TwoWidths()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = CFG.replace(packdir=str(tmp_path))
    report = quantize(model, cfg, calibrate=calibrate, progress=False, verbose=False)
    assert {r.name: r.permutation for r in report.layers} == {"fc1": "shuffle", "fc2": "zigzag"}
    assert f"permutation: shuffle x1, zigzag x1 ({FALLBACK})" in report.summary()
    assert is_shuffle_permutation(model.fc1.transform) and not is_shuffle_permutation(model.fc2.transform)
    # the same float model again: both layers come from the packs, with their permutation
    again = TwoWidths()
    again.load_state_dict(weights)
    reused = quantize(again, cfg, calibrate=calibrate, progress=False, verbose=False)
    assert reused.pack_hits == 2
    assert {r.name: r.permutation for r in reused.layers} == {"fc1": "shuffle", "fc2": "zigzag"}
    assert torch.equal(again.fc1.transform.rot1, model.fc1.transform.rot1)
    # a zigzag run does not take the shuffle packs
    zig = TwoWidths()
    zig.load_state_dict(weights)
    rep = quantize(zig, cfg.replace(permute="zigzag"), calibrate=calibrate, progress=False, verbose=False)
    assert rep.pack_hits == 0 and {r.permutation for r in rep.layers} == {"zigzag"}


def test_report_runs_one_row_per_permutation_for_duquant_only():
    from duquant.report import report_model, to_markdown

    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(16, 256, generator=g) for _ in range(4)]
    model = TwoWidths()
    doc = report_model(model, lambda i: inputs[i], lambda m, x: m(x), methods=("hadamard", "duquant"),
                       calib_batches=2, eval_batches=2, base=DuQuantConfig(rotation_steps=8),
                       permutations=("zigzag", "shuffle"))
    rows = {r["label"]: r for r in doc["rows"]}
    assert list(rows) == ["hadamard", "duquant", "duquant+shuffle"]
    assert rows["hadamard"]["permutation"] is None and rows["hadamard"]["permutations_used"] == {}
    assert rows["duquant"]["permutations_used"] == {"zigzag": 2}
    assert rows["duquant+shuffle"]["permutations_used"] == {"shuffle": 1, "zigzag": 1}
    assert FALLBACK in rows["duquant+shuffle"]["permutation_note"]
    doc.update(model={"config": "two-widths", "checkpoint": None}, created="now", duquant_version="x",
               environment={"torch": torch.__version__},
               data={"calibration": "random", "evaluation": "random", "eval_batches": 2, "batch_size": 16},
               timing={**{k: doc[k] for k in ("calibration_seconds", "calibrated_layers")}, "total_seconds": 1})
    for r in doc["rows"]:
        r["part"] = "all"
    md = to_markdown(doc)
    assert f"- all / duquant+shuffle / w4a8: permutation: shuffle x1, zigzag x1 ({FALLBACK})" in md
    assert "- all / duquant / w4a8" not in md  # zigzag was asked for and every layer got it
