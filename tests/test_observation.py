"""Observation container, openpi preprocessing, the observation file format and the tokenizers."""

import numpy as np
import pytest
import torch

from duquant.models import (
    IMAGE_KEYS,
    Observation,
    get_config,
    load_observations,
    load_tokenizer,
    make_synthetic_observation,
    normalize_image,
    preprocess_observation,
    resize_with_pad,
    save_observations,
)
from duquant.models.tokenizer import FallbackTokenizer, discretize_state


@pytest.fixture(scope="module")
def obs():
    return make_synthetic_observation(get_config("pi0-tiny"), batch_size=3, seed=2)


def test_synthetic_observation_shapes_and_determinism(obs):
    cfg = get_config("pi0-tiny")
    assert obs.batch_size == 3 and set(obs.images) == set(IMAGE_KEYS)
    assert obs.images["base_0_rgb"].shape == (3, 3, 224, 224) and obs.images["base_0_rgb"].dtype == torch.float32
    assert obs.images["base_0_rgb"].min() >= -1 and obs.images["base_0_rgb"].max() <= 1
    assert obs.image_masks["base_0_rgb"].all() and not obs.image_masks["right_wrist_0_rgb"].any()
    assert obs.state.shape == (3, 32)
    assert obs.tokenized_prompt.shape == obs.tokenized_prompt_mask.shape == (3, cfg.max_token_len)
    assert (obs.tokenized_prompt[:, 0] == 2).all() and (obs.tokenized_prompt[~obs.tokenized_prompt_mask] == 0).all()
    again = make_synthetic_observation(cfg, batch_size=3, seed=2)
    assert all(torch.equal(obs.images[k], again.images[k]) for k in IMAGE_KEYS)
    assert torch.equal(obs.tokenized_prompt, again.tokenized_prompt)
    assert not torch.equal(obs.state, make_synthetic_observation(cfg, batch_size=3, seed=3).state)


def test_select_concat_and_to(obs):
    parts = [obs.select([0]), obs.select(slice(1, 3))]
    assert [p.batch_size for p in parts] == [1, 2]
    back = Observation.concat(parts)
    assert torch.equal(back.state, obs.state) and torch.equal(back.images["left_wrist_0_rgb"],
                                                              obs.images["left_wrist_0_rgb"])
    half = obs.to("cpu", torch.float16)
    assert half.state.dtype == torch.float16 and half.images["base_0_rgb"].dtype == torch.float16
    assert half.tokenized_prompt.dtype == torch.int64 and half.image_masks["base_0_rgb"].dtype == torch.bool


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_observation_file_roundtrip(tmp_path, obs, suffix):
    path = save_observations(tmp_path / f"calib{suffix}", [obs.select([0]), obs.select([1, 2])])
    back = load_observations(path)
    for k in IMAGE_KEYS:
        assert torch.equal(back.images[k], obs.images[k]) and torch.equal(back.image_masks[k], obs.image_masks[k])
    assert torch.equal(back.state, obs.state)
    assert torch.equal(back.tokenized_prompt, obs.tokenized_prompt)
    assert torch.equal(back.tokenized_prompt_mask, obs.tokenized_prompt_mask)


def test_observation_file_errors(tmp_path, obs):
    with pytest.raises(ValueError, match=".safetensors or .npz"):
        save_observations(tmp_path / "x.pt", obs)
    with pytest.raises(FileNotFoundError):
        load_observations(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", state=np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="lacks"):
        load_observations(tmp_path / "partial.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a readable observation file"):
        load_observations(tmp_path / "junk.safetensors")


def test_resize_with_pad_like_openpi():
    img = torch.full((1, 100, 200, 3), 255, dtype=torch.uint8)  # channels-last, 2:1
    out = resize_with_pad(img, 224, 224)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.uint8
    assert out[0, :, :56].max() == 0 and out[0, :, 56:168].min() == 255 and out[0, :, 168:].max() == 0
    f = torch.ones(2, 3, 50, 25)  # float, channels-first, 1:2, padded with -1
    out = resize_with_pad(f, 224, 224)
    # the resized ones are 1 to float32 rounding (one ulp below with a single OpenMP thread: summation order)
    inner = out[..., :, 56:168]
    assert out.shape == (2, 3, 224, 224) and out[..., :, :56].max() == -1 and out[..., :, 168:].max() == -1
    assert torch.allclose(inner, torch.ones_like(inner), rtol=0, atol=1e-6)
    same = torch.rand(1, 3, 224, 224)
    assert torch.equal(resize_with_pad(same), same)


def test_normalize_and_preprocess(obs):
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert torch.equal(normalize_image(u8), u8.float() / 255.0 * 2.0 - 1.0)
    assert normalize_image(u8)[0] == -1 and normalize_image(u8)[-1] == 1
    assert preprocess_observation(obs) is obs  # already prepared: nothing to do
    raw = obs.select([0])
    raw.images = {"base_0_rgb": torch.zeros(1, 240, 320, 3, dtype=torch.uint8)}
    raw.image_masks = {}
    out = preprocess_observation(raw)
    assert out.images["base_0_rgb"].shape == (1, 3, 224, 224) and out.images["base_0_rgb"].dtype == torch.float32
    assert out.image_masks["base_0_rgb"].all()


def test_fallback_tokenizer_formats():
    tok = load_tokenizer(None, max_len=16, vocab_size=512)
    assert isinstance(tok, FallbackTokenizer)
    ids, mask = tok.tokenize("  pick_up the bowl\n")
    assert ids.dtype == np.int64 and mask.dtype == bool and ids.shape == mask.shape == (16,)
    assert ids[0] == 2 and ids[mask.sum() - 1] == 3 and mask.sum() == 6  # BOS, 4 words, newline
    assert (ids[~mask] == 0).all() and (ids < 512).all()
    assert np.array_equal(ids, tok.tokenize("pick up the bowl")[0])  # cleaned like openpi
    long_ids, long_mask = tok.tokenize("word " * 40)
    assert long_mask.all() and long_ids.shape == (16,)
    ids5, mask5 = load_tokenizer(None, max_len=64).tokenize("go", state=np.array([-1.0, 0.0, 0.999, 2.0]))
    assert mask5.sum() == 9  # BOS + "Task:", "go,", "State:", "0", "128", "255", "256;", "Action:"
    assert discretize_state(np.array([-1.0, 0.0, 0.999, 2.0])).tolist() == [0, 128, 255, 255]


def test_paligemma_tokenizer_errors(tmp_path):
    pytest.importorskip("sentencepiece")
    with pytest.raises(FileNotFoundError, match="paligemma_tokenizer.model"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


def test_paligemma_tokenizer_format_with_a_small_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["pick up the black bowl and place it on the plate", "open the top drawer",
                                  "Task: put both pots on the stove, State: 1 2 3;", "Action: move"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", user_defined_symbols=["\n"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tok = load_tokenizer(tmp_path / "sp.model", max_len=48)
    ids, mask = tok.tokenize("open_the top drawer ")
    expected = sp.encode("open the top drawer", add_bos=True) + sp.encode("\n")
    assert ids[: mask.sum()].tolist() == expected and (ids[mask.sum():] == 0).all()
    ids5, mask5 = tok.tokenize("open the top drawer", state=np.array([0.0, -0.5]))
    assert ids5[: mask5.sum()].tolist() == sp.encode("Task: open the top drawer, State: 128 64;\nAction: ",
                                                     add_bos=True)
