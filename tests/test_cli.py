"""The `duquant` CLI on full-size configs built on meta (no weights) and on the tiny pi0."""

import json
import subprocess
import sys

import pytest

from duquant.cli import main

LLM = "paligemma_with_expert.paligemma.model.language_model."


def run_cli(args, capsys, env=None, monkeypatch=None):
    if env and monkeypatch:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config", ["pi0", "pi05"])
@pytest.mark.parametrize("preset,count", [("llm", 126), ("dit", 126), ("vision", 162), ("full", 414)])
def test_layers_counts_on_full_size(config, preset, count, capsys):
    code, out, _ = run_cli(["layers", "--config", config, "--preset", preset], capsys)
    assert code == 0
    assert out.strip().splitlines()[-1] == f"Matched Linear layers: {count}"
    assert len(out.strip().splitlines()) == count + 1


def test_layers_line_format(capsys):
    code, out, _ = run_cli(["layers", "--config", "pi0", "--preset", "llm"], capsys)
    first = out.splitlines()[0]
    assert first == (f"{LLM}layers.0.self_attn.q_proj: 2048\u21922048, w4a8 (int4 weights, int8 activations), "
                     "duquant, block 128, permute zigzag")


def test_scope_from_environment(capsys, monkeypatch):
    code, out, _ = run_cli(["layers", "--config", "pi0"], capsys, {"OPENPI_DUQUANT_SCOPE": LLM}, monkeypatch)
    assert code == 0 and out.strip().endswith("Matched Linear layers: 126")


def test_wrong_scope_exits_nonzero_with_suggestion(capsys, monkeypatch):
    env = {"OPENPI_DUQUANT_SCOPE": "paligemma_with_expert.paligemma.language_model."}
    code, out, err = run_cli(["layers", "--config", "pi0"], capsys, env, monkeypatch)
    assert code != 0
    assert f"did you mean `{LLM}`" in err
    assert "Matched Linear layers" not in out


def test_unknown_env_variable_is_an_error(capsys, monkeypatch):
    code, _, err = run_cli(["layers", "--config", "pi0"], capsys, {"OPENPI_DUQUANT_BLOKC": "16"}, monkeypatch)
    assert code == 2 and "OPENPI_DUQUANT_BLOCK" in err


@pytest.mark.parametrize("preset", ["llm", "dit", "vision", "llm+dit", "full"])
def test_verify_presets(preset, capsys):
    code, out, _ = run_cli(["verify", "--config", "pi0", "--preset", preset], capsys)
    assert code == 0, out
    assert "verify: OK" in out


def test_verify_mismatch_exits_nonzero(capsys):
    code, out, _ = run_cli(["verify", "--config", "pi0", "--preset", "llm", "--include", ".*(q_proj|k_proj).*"],
                           capsys)
    assert code == 1 and "MISMATCH" in out


def test_quantize_twice_reuses_packs(tmp_path, capsys):
    args = ["quantize", "--config", "pi0-tiny", "--preset", "dit", "--packdir", str(tmp_path / "p"),
            "--calib-steps", "2", "--rotation-steps", "16", "--out", str(tmp_path / "q1.json")]
    assert main(args) == 0
    first = json.loads((tmp_path / "q1.json").read_text())
    args[-1] = str(tmp_path / "q2.json")
    assert main(args) == 0
    second = json.loads((tmp_path / "q2.json").read_text())
    n = len(first["report"]["layers"])
    assert n > 0
    assert first["report"]["pack_misses"] == n and second["report"]["pack_hits"] == n
    assert second["action_rel_mse"] == first["action_rel_mse"]  # bit-identical weights, same outputs
    capsys.readouterr()


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "duquant.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("layers", "verify", "quantize", "report"):
        assert cmd in out.stdout
