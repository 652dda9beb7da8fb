"""Formats chosen from the config (issue 12, item 2): `--format` / `--format-overrides` (and their OPENPI_DUQUANT_*
twins, and DuQuantConfig fields), their precedence against --wbits / --abits, the engine's per-layer formats
(identity transform for weight-only formats, fp8 weights from the format's own rounding), pack keys that hold the
format, `duquant layers` / the quantization report / `duquant report` naming each format by its label."""

import argparse
import json

import pytest
import torch
from torch import nn

from duquant.api import quantize
from duquant.cli import main
from duquant.config import (
    ConfigError,
    DuQuantConfig,
    add_cli_args,
    from_args,
    parse_env,
    parse_format_overrides,
    parse_wbits_overrides,
)
from duquant.layers import DuQuantLinear

EXPERT = "paligemma_with_expert.gemma_expert."
RECIPE = ("re:gemma_expert", "w4a16")


def cli_config(argv, env=None) -> DuQuantConfig:
    p = argparse.ArgumentParser()
    add_cli_args(p)
    return from_args(p.parse_args(argv), env or {})


# ---- config: parsing, precedence, unknown names -------------------------------------------------------------------

def test_format_flag_env_and_python_field():
    assert DuQuantConfig().format_name == "w4a8" and DuQuantConfig().format is None  # default: what the bits mean
    c = cli_config(["--format", "W8A8-FP8"])
    assert (c.format, c.wbits, c.abits, c.format_name) == ("w8a8-fp8", 8, 8, "w8a8-fp8")
    c = DuQuantConfig.from_env({"OPENPI_DUQUANT_FORMAT": "w4a16"})
    assert (c.format, c.wbits, c.abits, c.quantize_activations) == ("w4a16", 4, 16, False)
    c = DuQuantConfig(format="w8a8")
    assert (c.wbits, c.abits) == (8, 8)  # wbits / abits at their defaults take the format's values
    assert DuQuantConfig.from_dict(c.to_dict()) == c


def test_format_overrides_reuse_the_wbits_parser_syntax():
    spec = "re:gemma_expert:w4a16,a.b.q_proj:w8a8-fp8"
    assert parse_format_overrides("X", spec) == (("re:gemma_expert", "w4a16"), ("a.b.q_proj", "w8a8-fp8"))
    assert parse_wbits_overrides("X", "re:gemma_expert:8") == (("re:gemma_expert", 8),)
    for parse in (parse_format_overrides, parse_wbits_overrides):  # one parser: same error for a bad entry
        with pytest.raises(ConfigError, match="must look like 'layer.name:"):
            parse("X", "no_colon_here")
    assert parse_env({"OPENPI_DUQUANT_FORMAT_OVERRIDES": spec})["format_overrides"] == \
        parse_format_overrides("X", spec)
    c = cli_config(["--format-overrides", spec])
    assert c.format_overrides == parse_format_overrides("X", spec)
    assert c.layer_format(f"{EXPERT}model.layers.3.mlp.up_proj") == "w4a16"
    assert c.layer_format("a.b.q_proj") == "w8a8-fp8"  # exact name
    assert c.layer_format("a.b.k_proj") == "w4a8"  # no match: the global format
    assert c.bits_for(f"{EXPERT}x") == 4 and c.bits_for("a.b.q_proj") == 8
    assert DuQuantConfig.from_dict(c.to_dict()) == c


def test_format_overrides_and_wbits_overrides_together():
    c = DuQuantConfig(wbits_overrides=(("re:down_proj", 8),), format_overrides=(("re:expert", "w4a16"),))
    assert c.layer_format("llm.down_proj") == "w8a8"  # an integer format takes the layer's weight bits
    assert c.layer_format("expert.down_proj") == "w4a16"  # a format override fixes the bits: it wins
    fp8 = DuQuantConfig(format="w8a8-fp8", wbits_overrides=(("re:down_proj", 4),))
    with pytest.raises(ConfigError, match="fixed bits.*--format-overrides"):
        fp8.layer_format("llm.down_proj")


def test_precedence_format_against_wbits_abits():
    # a flag beats the other setting from the environment, whole
    assert cli_config(["--format", "w4a16"], {"OPENPI_DUQUANT_WBITS_DEFAULT": "8"}).format_name == "w4a16"
    assert cli_config(["--wbits", "8"], {"OPENPI_DUQUANT_FORMAT": "w4a16"}).format_name == "w8a8"
    # consistent in one source: fine; contradictory in one source: an error naming both
    assert cli_config(["--format", "w4a16", "--abits", "16"]).format_name == "w4a16"
    with pytest.raises(ConfigError, match="--format and --wbits / --abits disagree"):
        cli_config(["--format", "w4a16", "--abits", "8"])
    with pytest.raises(ConfigError, match="OPENPI_DUQUANT_FORMAT and OPENPI_DUQUANT_WBITS_DEFAULT"):
        DuQuantConfig.from_env({"OPENPI_DUQUANT_FORMAT": "w8a8-fp8", "OPENPI_DUQUANT_WBITS_DEFAULT": "4"})
    with pytest.raises(ConfigError, match="give --format or --wbits/--abits, not both"):
        DuQuantConfig(format="w8a8", wbits=2)


def test_unknown_format_names_fail_at_config_time_with_the_known_names(capsys):
    with pytest.raises(ConfigError, match="unknown format 'w4a9'.*w4a16.*w8a8-fp8"):
        cli_config(["--format", "w4a9"])
    with pytest.raises(ConfigError, match="FORMAT_OVERRIDES.*unknown format 'fp9'.*w4a8"):
        DuQuantConfig.from_env({"OPENPI_DUQUANT_FORMAT_OVERRIDES": "re:x:fp9"})
    with pytest.raises(ConfigError, match="bad regex"):
        DuQuantConfig(format_overrides=(("re:(", "w4a16"),))
    assert main(["layers", "--config", "pi0", "--format-overrides", "re:gemma_expert:w4a17"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "w4a16" in err


def test_fp8_layers_refuse_integer_only_settings(capsys):
    assert main(["layers", "--config", "pi0", "--preset", "llm", "--format", "w8a8-fp8",
                 "--weight-rounding", "gptq"]) == 2
    assert "126 selected layers" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="w8a8-fp8.*--clip-search"):
        quantize(toy(), TOY.replace(format_overrides=(("re:q_proj", "w8a8-fp8"),), clip_search=True),
                 calibrate=calibrate, progress=False, verbose=False)


# ---- pack keys ---------------------------------------------------------------------------------------------------

def test_pack_key_holds_the_format():
    name = f"{EXPERT}model.layers.0.self_attn.q_proj"
    base = DuQuantConfig()
    keys = {
        "w4a8": base.layer_hash(name),
        "w4a16 override": base.replace(format_overrides=(RECIPE,)).layer_hash(name),
        "w4a16": DuQuantConfig(format="w4a16").layer_hash(name),
        "fp8": DuQuantConfig(format="w8a8-fp8").layer_hash(name),
        "w8a8": DuQuantConfig(format="w8a8").layer_hash(name),
    }
    assert len(set(keys.values())) == len(keys), keys
    # a layer the overrides do not reach keeps its key
    assert base.replace(format_overrides=(RECIPE,)).layer_hash("llm.q_proj") == base.layer_hash("llm.q_proj")
    # packs written before formats were selectable stay valid: the default key is the one they were written with
    assert DuQuantConfig().layer_hash("x") == "4f828fdba824b7ff"
    assert DuQuantConfig(format="w4a8").layer_hash("x") == "4f828fdba824b7ff"


# ---- the engine on a generic model ----------------------------------------------------------------------------------

class Attn(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("gain", torch.ones(d))
        self.gain[[3, 17]] = 30.0

    def forward(self, x):
        h = x * self.gain
        return x + self.o_proj(self.q_proj(h).tanh() * self.k_proj(h) + self.v_proj(h))


def toy(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(Attn(), Attn()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
    return model


DATA = [torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
TOY = DuQuantConfig(block_size=16, rotation_steps=16)


def calibrate(m):
    for x in DATA:
        m(x)


def layers_of(model) -> dict[str, DuQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear)}


def test_group_split_by_transform_and_weight_only_needs_no_calibration(capsys):
    # q_proj alone in w4a16: its q/k/v group splits; k/v keep sharing one DuQuant transform
    model = toy()
    rep = quantize(model, TOY.replace(format_overrides=(("re:q_proj", "w4a16"),)), calibrate=calibrate,
                   progress=False)
    assert "method duquant skipped on 2 layers of weight-only format w4a16" in capsys.readouterr().err
    q = layers_of(model)
    assert q["0.q_proj"].format == "w4a16" and q["0.q_proj"].transform.is_identity
    assert q["0.q_proj"].transform.kind == "identity" and q["0.q_proj"].method == "rtn"
    assert q["0.k_proj"].transform is q["0.v_proj"].transform and q["0.k_proj"].transform.kind == "duquant"
    assert {r.name: r.format_label for r in rep.layers}["0.q_proj"] == "w4a16 (int4 weights, bf16 activations)"
    assert rep.to_dict()["formats"]["other"] == {"w4a8 (int4 weights, int8 activations)": 6,
                                                 "w4a16 (int4 weights, bf16 activations)": 2}

    # a calibration recorded without the weight-only layers is enough: they need no statistics
    from duquant.calibration import calibrate as record

    model = toy()
    w4a8 = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("q_proj")}
    recorded = record(model, w4a8, calibrate)
    quantize(model, TOY.replace(format_overrides=(("re:q_proj", "w4a16"),)), calibration=recorded, progress=False,
             verbose=False)
    q = layers_of(model)
    assert q["1.q_proj"].transform.is_identity and q["1.k_proj"].transform.kind == "duquant"

    # every layer weight-only with rtn rounding: no statistics needed, so no calibrate function either
    model = toy()
    rep = quantize(model, TOY.replace(format="w4a16"), progress=False, verbose=False)
    assert rep.calibration_seconds == 0.0
    assert all(m.transform.is_identity and m.format == "w4a16" for m in layers_of(model).values())
    # ... but GPTQ needs them, and says so
    with pytest.raises(ValueError, match="weight rounding 'gptq' needs activation statistics"):
        quantize(toy(), TOY.replace(format="w4a16", weight_rounding="gptq"), progress=False, verbose=False)


def test_weight_only_gptq_beats_rtn_and_fp8_is_close():
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(99))
    ref = toy()(x)
    errs = {}
    for label, cfg in {"rtn": TOY.replace(format="w4a16"),
                       "gptq": TOY.replace(format="w4a16", weight_rounding="gptq"),
                       "fp8": TOY.replace(format="w8a8-fp8")}.items():
        model = toy()
        quantize(model, cfg, calibrate=calibrate, progress=False, verbose=False)
        with torch.no_grad():
            errs[label] = float((model(x) - ref).pow(2).sum() / ref.pow(2).sum())
        if label == "fp8":  # the format's reference needs e4m3 codes (as uint8) and one scale per channel
            layer = layers_of(model)["0.q_proj"]
            assert layer.qweight.dtype == torch.uint8 and layer.w_zero is None and layer.w_scale.shape == (64,)
            assert layer.transform.kind == "duquant" and layer.act_clip == 1.0
    assert errs["fp8"] < errs["gptq"] < 0.6 * errs["rtn"] and errs["rtn"] < 0.3, errs


def test_packs_never_reused_across_formats(tmp_path):
    x = DATA[0]
    packs = str(tmp_path / "packs")
    a = toy()
    rep = quantize(a, TOY.replace(packdir=packs), calibrate=calibrate, progress=False, verbose=False)
    assert rep.pack_misses == 8
    # the same packdir, now with q/k/v of block 0 in w4a16: those 3 recomputed (stale: config changed), 5 reused
    cfg = TOY.replace(packdir=packs, format_overrides=(("re:^0\\.(q|k|v)_proj", "w4a16"),))
    b = toy()
    rep = quantize(b, cfg, calibrate=calibrate, progress=False, verbose=False)
    assert (rep.pack_hits, rep.pack_misses) == (5, 3)
    assert {n for n, _ in rep.stale} == {"0.q_proj", "0.k_proj", "0.v_proj"}
    assert layers_of(b)["0.k_proj"].format == "w4a16"
    # and back: the w4a16 packs are not taken for w4a8 either
    rep = quantize(toy(), TOY.replace(packdir=packs), calibrate=calibrate, progress=False, verbose=False)
    assert rep.pack_misses == 3
    # fp8 packs: written, then reused bit for bit (the format's own weight container on load)
    fp8 = TOY.replace(format="w8a8-fp8", packdir=str(tmp_path / "fp8"))
    c = toy()
    quantize(c, fp8, calibrate=calibrate, progress=False, verbose=False)
    d = toy()
    rep = quantize(d, fp8, progress=False, verbose=False)  # all from packs: no calibration needed
    assert rep.pack_hits == 8 and all(m.format == "w8a8-fp8" for m in layers_of(d).values())
    with torch.no_grad():
        assert torch.equal(c(x), d(x))
    meta = json.loads((tmp_path / "fp8" / "manifest.json").read_text())["layers"]["0.q_proj"]
    assert meta["format"] == "w8a8-fp8"


# ---- pi0-tiny end to end (fake backend) --------------------------------------------------------------------------

def test_pi0_tiny_recipe_llm_and_vision_duquant_expert_w4a16(tmp_path, capsys):
    """The GPU recipe of docs/formats.md on the tiny pi0, fake backend: LLM + SigLIP DuQuant W4A8, the action expert
    w4a16 with GPTQ and no activation transform."""
    out = tmp_path / "q.json"
    args = ["quantize", "--config", "pi0-tiny", "--preset", "full", "--format-overrides", "re:gemma_expert:w4a16",
            "--weight-rounding", "gptq", "--packdir", str(tmp_path / "p"), "--rotation-steps", "8",
            "--block-size", "32", "--calib-steps", "2", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "method duquant skipped on 28 layers of weight-only format w4a16" in captured.err
    doc = json.loads(out.read_text())
    layers = doc["report"]["layers"]
    expert = [r for r in layers if EXPERT in r["name"]]
    others = [r for r in layers if EXPERT not in r["name"]]
    assert len(expert) == 28 and len(others) == 46
    assert all(r["format"] == "w4a16" and r["transform_kind"] == "identity" and r["weight_rounding"] == "gptq"
               and r["format_label"] == "w4a16 (int4 weights, bf16 activations)" for r in expert)
    assert all(r["format"] == "w4a8" and r["transform_kind"] == "duquant" and r["method"] == "duquant"
               for r in others)
    assert doc["report"]["formats"]["dit"] == {"w4a16 (int4 weights, bf16 activations)": 28}
    assert set(doc["report"]["formats"]) == {"llm", "vision", "dit"}
    mse = doc["action_rel_mse"]
    assert torch.isfinite(torch.tensor(mse)) and mse < 2e-2, mse
    # a rerun takes every layer from its pack
    assert main(args) == 0
    assert "(74 reused, 0 computed)" in capsys.readouterr().out

    # the dry run names every layer's format
    assert main(["quantize", "--config", "pi0", "--preset", "full", "--format-overrides", "re:gemma_expert:w4a16",
                 "--dryrun"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "Matched Linear layers: 414"
    expert_lines = [line for line in lines if EXPERT in line]
    assert len(expert_lines) == 126
    assert all("w4a16 (int4 weights, bf16 activations), no transform" in line for line in expert_lines)
    assert all("w4a8 (int4 weights, int8 activations), duquant" in line for line in lines[:-1]
               if EXPERT not in line)


def test_report_rows_for_weight_only_and_fp8(tmp_path):
    out = tmp_path / "r"
    # --format-rows adds w4a16, w8a8-fp8 and w4a8-fp8 to --bits (w4a16 given twice: one set of rows)
    assert main(["report", "--parts", "dit", "--bits", "w4a16", "--format-rows", "--methods", "rtn,duquant",
                 "--rotation-steps", "8", "--block-size", "32", "--calib-batches", "2", "--eval-batches", "1",
                 "--out", str(out), "--quiet", "--no-plot"]) == 0
    doc = json.loads((out / "report.json").read_text())
    rows = [(r["format"], r["label"]) for r in doc["rows"]]
    assert rows == [("w4a16", "rtn"), ("w4a16", "rtn+gptq"), ("w8a8-fp8", "rtn"), ("w8a8-fp8", "duquant"),
                    ("w4a8-fp8", "rtn"), ("w4a8-fp8", "duquant")]
    by = {(r["format"], r["label"]): r for r in doc["rows"]}
    assert by["w8a8-fp8", "duquant"]["format_label"] == "w8a8-fp8 (fp8-e4m3 weights, fp8-e4m3 activations)"
    assert by["w4a8-fp8", "duquant"]["format_label"] == "w4a8-fp8 (int4 weights, fp8-e4m3 activations)"
    assert by["w4a16", "rtn"]["transform_kinds"] == ["identity"]
    assert by["w4a16", "rtn+gptq"]["action_rel_mse"] < by["w4a16", "rtn"]["action_rel_mse"]
    md = (out / "report.md").read_text()
    assert "w4a16 (int4 weights, bf16 activations)" in md and "int8" not in md
