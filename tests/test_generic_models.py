"""The engine is model-agnostic: a transformers BERT (built from a config, no download) quantizes and reports."""

import pytest
import torch

from duquant.api import quantize
from duquant.config import DuQuantConfig
from duquant.layers import DuQuantLinear

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    return cfg


def inputs(i):
    g = torch.Generator().manual_seed(i)
    return {"input_ids": torch.randint(0, 100, (2, 12), generator=g)}


def test_bert_quantizes_with_its_own_names(bert):
    model = transformers.BertModel(bert).eval()
    ref = model(**inputs(99)).last_hidden_state.detach()
    cfg = DuQuantConfig(scope="encoder.", include=r".*(query|key|value|dense).*", block_size=16, rotation_steps=16)

    def calibrate(m):
        for i in range(3):
            m(**inputs(i))

    report = quantize(model, cfg, calibrate=calibrate, progress=False, verbose=False)
    assert report.num_layers == 12  # 2 layers x (q, k, v, attn out, intermediate, output)
    assert isinstance(model.encoder.layer[0].attention.self.query, DuQuantLinear)
    assert not isinstance(model.pooler.dense, DuQuantLinear)
    groups = {tuple(r.group) for r in report.layers}
    assert any(len(g) == 3 and g[0].endswith("query") for g in groups)  # q/k/v detected as one input group
    out = model(**inputs(99)).last_hidden_state
    rel = float((out - ref).pow(2).sum() / ref.pow(2).sum())
    assert rel < 0.05


def test_report_model_on_bert(bert):
    from duquant.report import report_model

    model = transformers.BertModel(bert).eval()
    doc = report_model(model, inputs, lambda m, x: m(**x).last_hidden_state,
                       base=DuQuantConfig(scope="encoder.", include=r".*(query|key|value|dense).*", block_size=16,
                                           rotation_steps=16),
                       methods=("rtn", "duquant"), calib_batches=2, eval_batches=2)
    assert [r["method"] for r in doc["rows"]] == ["rtn", "duquant"]
    for r in doc["rows"]:
        assert r["num_layers"] == 12 and 0 < r["action_rel_mse"] < 1 and len(r["worst_layers"]) == 10
        assert r["weight_bytes_after"] < r["weight_bytes_before"]
    # the model is restored after each run
    assert not any(isinstance(m, DuQuantLinear) for m in model.modules())
