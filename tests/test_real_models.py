"""duquant report on a local transformers checkpoint: a tiny causal LM written by the test (no download)."""

import argparse
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from duquant import real_models  # noqa: E402

WORDS = ("the robot picks up the red block and puts it in the bowl then it moves the cup to the left "
         "of the plate while the arm stays above the table").split()


def tiny_checkpoint(path):
    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", *dict.fromkeys(WORDS)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)


def test_report_on_a_transformers_causal_lm(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_checkpoint(ckpt)
    assert real_models.is_transformers_checkpoint(ckpt) and not real_models.is_transformers_checkpoint(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 12))
    args = argparse.Namespace(checkpoint=str(ckpt), text=str(text), methods="rtn,duquant", bits="w8a8,w4a4",
                              weight_roundings="rtn,gptq", calibrations="one-pass", seq_len=32, calib_batches=3,
                              eval_batches=2, device="cpu", dtype="float32", block_size=32, rotation_steps=16,
                              out=str(tmp_path / "out"), quiet=True)
    assert real_models.run_report_cli(args) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["model"]["kind"] == "causal-lm" and doc["info"]["eval_batches"] == 2
    assert doc["info"]["calibrated_layers"] == 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head stays float
    rows = {(r["label"], r["bits"]): r for r in doc["rows"]}
    assert set(rows) == {(m, b) for m in ("rtn", "rtn+gptq", "duquant", "duquant+gptq") for b in ("w8a8", "w4a4")}
    assert all(r["ppl_ratio"] > 0 and r["num_layers"] == 14 for r in rows.values())
    assert abs(rows[("duquant", "w8a8")]["ppl_ratio"] - 1) < 0.02  # 8 bits barely moves a perplexity
    assert "| duquant+gptq |" in capsys.readouterr().out


def test_report_takes_shared_settings_from_the_environment(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    tiny_checkpoint(ckpt)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 12))
    monkeypatch.setenv("OPENPI_DUQUANT_W_CLIP", "0.9")
    monkeypatch.setenv("OPENPI_DUQUANT_GPTQ_DAMP", "0.1")
    monkeypatch.setenv("OPENPI_DUQUANT_FORMAT", "w4a16")  # per row in a report: not read
    monkeypatch.setenv("OPENPI_DUQUANT_SCOPE", "paligemma")  # the report selects the numbered blocks itself
    seen = []
    real_run_rows = real_models.run_rows
    monkeypatch.setattr(real_models, "run_rows", lambda *a, **k: (seen.append(k["base"]), real_run_rows(*a, **k))[1])
    args = argparse.Namespace(checkpoint=str(ckpt), text=str(text), methods="duquant", bits="w4a4",
                              weight_roundings="gptq", calibrations="one-pass", seq_len=32, calib_batches=3,
                              eval_batches=2, device="cpu", dtype="float32", block_size=32, rotation_steps=16,
                              out=str(tmp_path / "out"), quiet=True)
    assert real_models.run_report_cli(args) == 0
    assert seen[0].w_clip == 0.9 and seen[0].gptq_damp == 0.1
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["settings"] == {"w_clip": 0.9, "gptq_damp": 0.1, "block_size": 32, "rotation_steps": 16}
    assert "w_clip 0.9" in (tmp_path / "out" / "report.md").read_text()


def test_text_windows_are_disjoint_and_start_with_bos(tmp_path):
    tiny_checkpoint(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    wins = real_models.text_windows(tok, " ".join(WORDS * 3), 10, 5)
    assert len(wins) == 5 and all(w.shape == (1, 10) and int(w[0, 0]) == tok.bos_token_id for w in wins)
    body = torch.cat([w[0, 1:] for w in wins])
    assert torch.equal(body, tok(" ".join(WORDS * 3), add_special_tokens=False,
                                 return_tensors="pt")["input_ids"][0][: body.numel()])
