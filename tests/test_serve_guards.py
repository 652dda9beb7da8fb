"""What the policy server refuses (non-finite input, a state of the wrong length), what it serves with a
warning (an over-long prompt, a tiny image), and the failures it counts (batches retried one by one)."""

import dataclasses
import json
import logging
import urllib.request

import numpy as np
import pytest

from duquant.serve.guards import InputError, state_length, tokenize_bounded
from duquant.serve.policy import BasePolicy, ModelPolicy, NormStats, Transforms
from test_serve import ThreadServer, libero_obs


@pytest.fixture(scope="module")
def pi0_tiny():
    from duquant.models import build_policy

    return build_policy("pi0-tiny")


@pytest.fixture(scope="module")
def policy(pi0_tiny):
    return ModelPolicy(pi0_tiny, Transforms.for_libero(False))


@pytest.mark.parametrize("key,index", [("observation/state", 3), ("observation/image", (7, 9, 1)),
                                       ("observation/wrist_image", (0, 0, 0))])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused(policy, key, index, value):
    obs = libero_obs(float_images=True)
    arr = np.array(obs[key], dtype=np.float64)
    arr[index] = value
    with pytest.raises(InputError, match=f"{key} holds 1 non-finite"):
        policy.prepare({**obs, key: arr})


def test_state_length_mismatch_is_an_error_unless_zero_pad_is_asked(pi0_tiny, policy):
    for n in (7, 9):
        with pytest.raises(InputError, match=f"state has {n} dims, the policy expects 8"):
            policy.prepare({**libero_obs(), "observation/state": np.zeros(n)})
    with pytest.raises(InputError, match="--state-pad zero"):
        policy.prepare({**libero_obs(), "observation/state": np.zeros(7)})
    # the opt-in: normalise the 7 given dims, then zeros; the reply says so
    stats = {"state": NormStats(mean=np.arange(8.0), std=np.full(8, 2.0))}
    padded = ModelPolicy(pi0_tiny, dataclasses.replace(Transforms.for_libero(False), state_pad="zero"),
                         norm_stats=stats)
    state7 = np.arange(7.0) + 1.0
    prepared = padded.prepare({**libero_obs(), "observation/state": state7})
    expected = np.zeros(32)
    expected[:7] = (state7 - np.arange(7.0)) / (2.0 + 1e-6)
    np.testing.assert_allclose(prepared["state"], expected)
    assert prepared["warnings"] == ["state of 7 dims padded with zeros to 8 (--state-pad zero)"]
    with pytest.raises(InputError, match="does not crop"):
        padded.prepare({**libero_obs(), "observation/state": np.zeros(9)})
    # the exact length passes untouched and without a warning
    assert "warnings" not in padded.prepare(libero_obs())


def test_generic_robot_without_stats_accepts_any_state_length():
    assert state_length(5, None, "error", "x") == 5
    assert state_length(5, 8, "zero", "x") == 8
    with pytest.raises(ValueError, match="unknown state pad policy"):
        state_length(5, 6, "edge", "x")


def test_over_long_prompt_is_cut_at_the_tokenizer_limit_and_reported(policy, caplog):
    tok = policy.pre.tokenizer
    long_prompt = " ".join(f"w{i}" for i in range(100_000))
    # the cut is the tokenizer's own truncation (openpi's): the first max_len tokens
    ref_tokens, ref_mask = tok.tokenize(long_prompt)
    tokens, mask, warning = tokenize_bounded(tok, long_prompt, None)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(mask, ref_mask)
    assert warning is not None and f"limit of {tok.max_len} tokens" in warning
    # a prompt that fits: identical tokens, no warning; one token over: cut and reported with its count
    short = "put the bowl on the plate"
    t2, m2, w2 = tokenize_bounded(tok, short, None)
    np.testing.assert_array_equal(t2, tok.tokenize(short)[0])
    assert w2 is None
    over = " ".join(["x"] * (tok.max_len - 1))  # BOS + max_len-1 words + newline = max_len + 1 tokens
    _, m3, w3 = tokenize_bounded(tok, over, None)
    assert m3.all() and w3 is not None and f"({tok.max_len + 1} tokens)" in w3
    with caplog.at_level(logging.WARNING, logger="duquant.serve"):
        out = policy.infer({**libero_obs(), "prompt": long_prompt})
    assert out["actions"].shape == (50, 7)
    assert any("was cut at the tokenizer's limit" in w for w in out["input_warnings"])
    assert any("was cut at the tokenizer's limit" in r.getMessage() for r in caplog.records)


def test_tiny_image_is_resized_with_a_warning(policy, caplog):
    obs = {**libero_obs(), "observation/image": np.full((5, 5, 3), 128, dtype=np.uint8)}
    with caplog.at_level(logging.WARNING, logger="duquant.serve"):
        prepared = policy.prepare(obs)
    assert prepared["image"]["base_0_rgb"].shape == (224, 224, 3)  # openpi's resize with pad is kept
    assert any("5x5 pixels" in w for w in prepared["warnings"])
    assert any("5x5 pixels" in r.getMessage() for r in caplog.records)
    assert "warnings" not in policy.prepare(libero_obs())
    with pytest.raises(InputError, match="empty"):
        policy.prepare({**libero_obs(), "observation/image": np.zeros((0, 4, 3), dtype=np.uint8)})


def test_repeated_warnings_are_logged_sparsely(policy, caplog):
    obs = {**libero_obs(), "observation/wrist_image": np.full((6, 6, 3), 9, dtype=np.uint8)}
    with caplog.at_level(logging.WARNING, logger="duquant.serve"):
        for _ in range(12):
            policy.pre.prepare(obs)
    lines = [r.getMessage() for r in caplog.records if "6x6" in r.getMessage()]
    assert len(lines) == 2 and lines[1].endswith("(seen 10 times)")


class FlakyBatchPolicy(BasePolicy):
    """Answers single requests; a batch holding a request marked 'bad' fails as a whole."""

    def infer(self, obs):
        if obs.get("bad"):
            raise InputError("bad request")
        return {"actions": np.full((2, 3), float(obs["i"]))}

    def infer_batch(self, batch):
        if any(o.get("bad") for o in batch):
            raise RuntimeError("batch failed")
        return [self.infer(o) for o in batch]


def test_failed_batch_is_logged_counted_and_retried_alone(caplog):
    srv = ThreadServer(FlakyBatchPolicy(), batch_window_ms=1, max_batch=4, warmup=False)
    try:
        with caplog.at_level(logging.WARNING, logger="duquant.serve"):
            results = srv.server._run_batch([{"i": 1}, {"bad": True}, {"i": 3}])
        assert isinstance(results[1], InputError)
        assert [float(r["actions"][0, 0]) for r in (results[0], results[2])] == [1.0, 3.0]
        assert any("a batch of 3 requests failed" in r.getMessage() for r in caplog.records)
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=10) as r:
            first, counters = r.read().decode().split("\n", 1)
        assert first == "OK" and json.loads(counters)["batch_failures"] == 1
    finally:
        srv.close()


def test_quantized_server_logs_calibration_and_warns_on_a_short_calibration_file(tmp_path, caplog):
    from duquant.config import DuQuantConfig
    from duquant.models import build_policy, make_synthetic_observation, save_observations
    from duquant.serve.policy import PolicySpec, create_policy

    cfg = build_policy("pi0-tiny", device="meta").config
    calib = save_observations(tmp_path / "calib.safetensors", make_synthetic_observation(cfg, 2, seed=1))
    q = DuQuantConfig(rotation_steps=2, block_size=32, calib_steps=3, packdir=str(tmp_path / "p")).with_preset("dit")
    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="duquant.serve"):
        create_policy(PolicySpec(config="pi0-tiny", quantize=q, calib=str(calib), calib_batch_size=2), log=lines.append)
    assert any("holds 2 observations (1 batches of 2), fewer than --calib-steps 3" in r.getMessage()
               for r in caplog.records)
    assert "calibration: 1 batches" in lines and any(x.startswith("calibration: batch 1/1,") for x in lines)
    assert any(x.startswith("quantized ") and "packs: 0 reused" in x for x in lines)


def test_serve_help_shows_the_defaults():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "duquant.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True, env={"PATH": "", "COLUMNS": "200"}).stdout
    for text in ("(default 64.0)", "--state-pad {error,zero}", "(default 8)", "(default 64)"):
        assert text in out, text


def test_generic_robot_state_length_comes_from_the_norm_stats(pi0_tiny):
    from duquant.serve.policy import GenericPolicy

    stats = {"state": NormStats(mean=np.zeros(14), std=np.ones(14))}
    pol = GenericPolicy(pi0_tiny, norm_stats=stats)
    assert pol.pre.expected_state_dim() == 14
    pol.warmup()  # its example observation has the expected length
    img = libero_obs()["observation/image"]
    assert pol.prepare({"image": {"base_0_rgb": img}, "state": np.ones(14), "prompt": "x"})["state"].shape == (32,)
    with pytest.raises(InputError, match="state has 10 dims, the policy expects 14"):
        pol.prepare({"image": {"base_0_rgb": img}, "state": np.ones(10), "prompt": "x"})
