"""`duquant quantize` says which observations it used: --eval-obs (as `report` takes it) for the action error, a
warning when the calibration file holds fewer batches than --calib-steps."""

import json

import torch

from duquant.cli import main
from duquant.models import build_policy, make_synthetic_observation, save_observations


def test_quantize_eval_obs_and_short_calibration_file(tmp_path, capsys):
    cfg = build_policy("pi0-tiny", device="meta").config
    calib = save_observations(tmp_path / "calib.safetensors", make_synthetic_observation(cfg, 3, seed=1))
    evals = save_observations(tmp_path / "eval.safetensors", make_synthetic_observation(cfg, 2, seed=2))
    args = ["quantize", "--config", "pi0-tiny", "--preset", "dit", "--packdir", str(tmp_path / "p"),
            "--rotation-steps", "4", "--block-size", "32", "--batch-size", "2", "--calib-steps", "5",
            "--calib", str(calib), "--eval-obs", str(evals), "--out", str(tmp_path / "q.json")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert f"{calib} holds 3 observations (2 batches of 2), fewer than --calib-steps 5" in err
    assert f"calibration: 3 observations from {calib}; action error measured on 2 from {evals}" in out
    assert f"action error vs float on {evals}:" in out
    data = json.loads((tmp_path / "q.json").read_text())["data"]
    assert data == {"calibration": str(calib), "calib_observations": 3, "evaluation": str(evals),
                    "eval_observations": 2}

    # the evaluation file's own observations: a different file gives a different error
    other = save_observations(tmp_path / "other.safetensors", make_synthetic_observation(cfg, 2, seed=7))
    args[args.index(str(evals))] = str(other)
    args[-1] = str(tmp_path / "q2.json")
    assert main(args) == 0
    first = json.loads((tmp_path / "q.json").read_text())["action_rel_mse"]
    second = json.loads((tmp_path / "q2.json").read_text())["action_rel_mse"]
    assert first != second and torch.isfinite(torch.tensor([first, second])).all()
    capsys.readouterr()
