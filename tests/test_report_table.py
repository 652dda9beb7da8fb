"""The report table printed to a pipe (not a terminal) keeps every number and name whole."""

import subprocess
import sys

ROW = {"part": "llm+dit", "method": "smoothquant", "bits": "w4a8", "num_layers": 252, "action_rel_mse": 3.7512e-3,
       "action_max_abs": 1.2346e-1, "layer_rel_err_mean": 6.789e-4, "weight_bytes_before": 5_000_000_000,
       "weight_bytes_after": 1_270_000_000, "model_bytes_before": 6_520_000_000, "model_bytes_after": 2_750_000_000,
       "quant_seconds": 123.45}


def test_piped_table_is_not_truncated():
    code = ("import json, sys; from duquant.report import print_table; "
            f"print_table({{'model': {{'config': 'pi0-tiny', 'checkpoint': None}}, 'rows': [{ROW!r}]}})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "COLUMNS": "80", "TERM": "dumb"}).stdout
    for text in ("llm+dit", "smoothquant", "3.751e-03", "1.235e-01", "6.79e-04", "4768.37→1211.17",
                 "6217.96→2622.60", "123.45"):
        assert text in out, (text, out)
    assert "…" not in out
