"""Time per phase of a quantization run (`duquant.timing`, QuantReport.phase_seconds, the quantize command's
"timing"): every phase is recorded, and on a GPU each boundary drains the queue so a phase pays for its own kernels."""

from __future__ import annotations

import json

import torch
from torch import nn

from duquant.api import quantize
from duquant.cli import main
from duquant.config import DuQuantConfig
from duquant.timing import PhaseTimer

PHASES = ["fingerprints", "pack_loads", "calibration", "transform_search", "rounding", "pack_writes", "swap"]


def test_quantize_reports_every_phase(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    cfg = DuQuantConfig(include=r".*", block_size=16, rotation_steps=8, packdir=str(tmp_path / "packs"))
    report = quantize(model, cfg, calibrate=lambda m: [m(torch.randn(8, 64)) for _ in range(4)], progress=False,
                      verbose=False)
    phases = report.phase_seconds
    assert list(phases) == PHASES and all(v >= 0 for v in phases.values())
    assert phases["calibration"] == round(report.calibration_seconds, 3)
    assert phases["transform_search"] + phases["rounding"] <= report.quantization_seconds + 1e-3
    assert "phases: fingerprints" in report.summary()
    assert json.loads(report.to_json())["phase_seconds"] == phases


def test_timer_drains_the_gpu_queue_at_each_boundary(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    timer = PhaseTimer("cuda:0")
    with timer("a"):
        pass
    start = timer.mark()
    timer.since("a", start)
    assert len(syncs) == 4 and set(timer.seconds) == {"a"}
    PhaseTimer("cpu").mark()
    PhaseTimer().mark()
    assert len(syncs) == 4  # nothing to drain on the CPU


def test_quantize_command_records_its_timing(tmp_path, capsys):
    out = tmp_path / "q.json"
    args = ["quantize", "--config", "pi0-tiny", "--preset", "dit", "--packdir", str(tmp_path / "p"),
            "--rotation-steps", "4", "--block-size", "32", "--calib-steps", "1", "--no-eval", "--out", str(out)]
    assert main(args) == 0
    assert "time: model load" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    timing = doc["timing"]
    assert {"model_load_seconds", "reference_seconds", "quantize_seconds", "total_seconds"} <= set(timing)
    assert timing["total_seconds"] >= timing["quantize_seconds"] >= sum(doc["report"]["phase_seconds"].values()) - 0.05
    assert list(doc["report"]["phase_seconds"]) == PHASES
