"""Configuration sources and layer selection, on a toy model with pi0's module names (no pi0 needed)."""

import pytest
import torch
from torch import nn

from duquant.config import PRESETS, ConfigError, DuQuantConfig, env_is_active, parse_env
from duquant.selection import SelectionError, nearest_prefix, select_layers, verify_selection


class Attn(nn.Module):
    def __init__(self, d, out_name="o_proj"):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        setattr(self, out_name, nn.Linear(d, d))


class GemmaMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class GemmaLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn, self.mlp = Attn(d), GemmaMLP(d)


class SiglipMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class SiglipLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn, self.mlp = Attn(d, "out_proj"), SiglipMLP(d)


def toy_pi0(n_llm=18, n_dit=18, n_vis=27, d=4) -> nn.Module:
    root = nn.Module()
    pwe = nn.Module()
    pali = nn.Module()
    pali.model = nn.Module()
    pali.model.language_model = nn.Module()
    pali.model.language_model.layers = nn.ModuleList(GemmaLayer(d) for _ in range(n_llm))
    pali.model.vision_tower = nn.Module()
    pali.model.vision_tower.vision_model = nn.Module()
    pali.model.vision_tower.vision_model.encoder = nn.Module()
    pali.model.vision_tower.vision_model.encoder.layers = nn.ModuleList(SiglipLayer(d) for _ in range(n_vis))
    pali.model.multi_modal_projector = nn.Module()
    pali.model.multi_modal_projector.linear = nn.Linear(d, d)
    pali.lm_head = nn.Linear(d, 8)
    expert = nn.Module()
    expert.model = nn.Module()
    expert.model.layers = nn.ModuleList(GemmaLayer(d) for _ in range(n_dit))
    expert.lm_head = nn.Linear(d, 8)
    pwe.paligemma, pwe.gemma_expert = pali, expert
    root.paligemma_with_expert = pwe
    root.action_in_proj, root.action_out_proj, root.state_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
    root.action_time_mlp_in, root.action_time_mlp_out = nn.Linear(2 * d, d), nn.Linear(d, d)
    return root


@pytest.fixture(scope="module")
def model():
    return toy_pi0()


@pytest.mark.parametrize("preset,count", [("llm", 126), ("dit", 126), ("vision", 162), ("llm+dit", 252),
                                          ("full", 414)])
def test_presets_select_expected_counts(model, preset, count):
    cfg = DuQuantConfig().with_preset(preset)
    sel = select_layers(model, cfg)
    assert len(sel) == count == PRESETS[preset].expected
    assert verify_selection(sel, preset).ok


def test_default_excludes_heads(model):
    names = select_layers(model, DuQuantConfig()).names
    assert not any(n.endswith(("lm_head", "action_out_proj", "action_in_proj", "state_proj", "linear"))
                   for n in names)
    with_head = select_layers(model, DuQuantConfig(include_action_head=True)).names
    assert "action_out_proj" in with_head


def test_wrong_scope_is_an_error_with_suggestion(model):
    cfg = DuQuantConfig(scope="paligemma_with_expert.paligemma.language_model.")
    with pytest.raises(SelectionError) as err:
        select_layers(model, cfg)
    msg = str(err.value)
    assert "0 Linear layers" in msg and "0 start with the scope" in msg
    assert "did you mean `paligemma_with_expert.paligemma.model.language_model.`" in msg
    assert "the model has 422 nn.Linear layers" in msg


def test_regexes_remove_everything_is_reported(model):
    cfg = DuQuantConfig(scope="paligemma_with_expert.gemma_expert.", include="nothing_matches_this")
    with pytest.raises(SelectionError, match="include/exclude regexes removed all"):
        select_layers(model, cfg)


def test_nearest_prefix_handles_extra_levels():
    names = ["a.model.language_model.layers.0.q_proj", "a.gemma_expert.model.layers.0.q_proj"]
    assert nearest_prefix("a.language_model.", names) == "a.model.language_model."
    assert nearest_prefix("a.gemma_expert.layers.", names) == "a.gemma_expert.model.layers."


def test_verify_detects_wrong_kinds(model):
    cfg = DuQuantConfig(preset="llm", scope=PRESETS["llm"].scope, include=r".*(q_proj|k_proj|v_proj|o_proj).*")
    result = verify_selection(select_layers(model, cfg), "llm")
    assert not result.ok
    assert any("BAD count" in line for line in result.lines)


def test_env_parsing_and_precedence():
    env = {"OPENPI_DUQUANT_SCOPE": "paligemma_with_expert.gemma_expert.model.", "OPENPI_DUQUANT_BLOCK": "16",
           "OPENPI_DUQUANT_PERMUTE": "0", "OPENPI_DUQUANT_ROW_ROT": "restore", "OPENPI_DUQUANT_LS": "0.15",
           "OPENPI_DUQUANT_ACT_PCT": "99.9", "OPENPI_DUQUANT_WBITS_DEFAULT": "4", "OPENPI_DUQUANT_ABITS": "8",
           "OPENPI_DUQUANT_WBITS": "a.b.q_proj:8,re:down_proj$:8", "OPENPI_DUQUANT_LAYERS": "x.y, z.w",
           "OPENPI_DUQUANT_DEBUG": "1", "OPENPI_DUQUANT_PACKDIR": "/tmp/p", "OPENPI_DUQUANT_PROFILE": "1",
           "OPENPI_DUQUANT_INCLUDE_ACTION_HEAD": "1", "OPENPI_DUQUANT_BLOCK_OUT": "16"}
    cfg = DuQuantConfig.from_env(env)
    assert (cfg.block_size, cfg.permute, cfg.row_rot, cfg.alpha, cfg.act_pct) == (16, "none", "restore", 0.15, 99.9)
    assert cfg.bits_for("a.b.q_proj") == 8 and cfg.bits_for("x.mlp.down_proj") == 8 and cfg.bits_for("x.v") == 4
    assert cfg.layers == ("x.y", "z.w") and cfg.debug and cfg.packdir == "/tmp/p" and cfg.include_action_head
    # Python/CLI over environment
    assert DuQuantConfig.from_env(env, block_size=64).block_size == 64
    assert env_is_active(env) and not env_is_active({"OPENPI_DUQUANT_PACKDIR": "/x"})


@pytest.mark.parametrize("env,needle", [
    ({"OPENPI_DUQUANT_SCOEP": "x"}, "did you mean OPENPI_DUQUANT_SCOPE"),
    ({"OPENPI_DUQUANT_INCLUDE": "(unclosed"}, "not a valid regular expression"),
    ({"OPENPI_DUQUANT_WBITS_DEFAULT": "5"}, "weight bits 5 not supported"),
    ({"OPENPI_DUQUANT_PRESET": "llmm"}, "unknown preset"),
    ({"OPENPI_DUQUANT_BLOCK": "abc"}, "OPENPI_DUQUANT_BLOCK='abc' is not an integer"),
    ({"OPENPI_DUQUANT_ROW_ROT": "sideways"}, "row rotation"),
    ({"OPENPI_DUQUANT_WBITS": "q_proj"}, "must look like"),
    ({"OPENPI_DUQUANT_PERMUTE": "maybe"}, "OPENPI_DUQUANT_PERMUTE: unknown permutation .maybe.; use one of zigzag"),
])
def test_bad_environment_values_name_the_variable(env, needle):
    with pytest.raises(ConfigError, match=needle):
        DuQuantConfig.from_env(env)


def test_layers_whitelist(model):
    name = "paligemma_with_expert.gemma_expert.model.layers.3.mlp.down_proj"
    assert select_layers(model, DuQuantConfig(layers=(name,))).names == [name]
    with pytest.raises(SelectionError, match="not nn.Linear"):
        select_layers(model, DuQuantConfig(layers=("paligemma_with_expert.nope",)))


def test_config_roundtrip_and_hash():
    cfg = DuQuantConfig(wbits=8, layers=("a",), wbits_overrides=(("b", 4),))
    assert DuQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.layer_hash("x") != DuQuantConfig().layer_hash("x")
    assert DuQuantConfig(scope="a.").layer_hash("x") == DuQuantConfig(scope="b.").layer_hash("x")
    with pytest.raises(ConfigError, match="unknown DuQuantConfig keys"):
        DuQuantConfig.from_dict({"wbit": 4})


def test_parse_env_ignores_other_variables():
    assert parse_env({"PATH": "/bin", "OPENPI_OTHER": "1"}) == {}
    assert torch.tensor(1)  # keeps torch import used by the fixtures' modules


def test_preset_given_in_python_selects_the_preset():
    """DuQuantConfig(preset=...) selects what --preset selects (it once selected every layer)."""
    from duquant.config import DuQuantConfig as Config
    from duquant.models import build_policy
    from duquant.selection import select_layers

    model = build_policy("pi0", device="meta")
    for preset, count in (("llm", 126), ("dit", 126), ("vision", 162)):
        assert len(select_layers(model, Config(preset=preset))) == count
    explicit = Config(preset="llm", scope="paligemma_with_expert.gemma_expert.model.")
    assert explicit.scope == "paligemma_with_expert.gemma_expert.model."  # an explicit scope wins
