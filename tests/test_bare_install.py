"""The core install runs every command's parser and the main job's imports without any optional package.

A subprocess gets a `sitecustomize` that makes the optional packages unimportable (as on a bare
`pip install -e .`), then runs the CLI. `duquant serve` must answer with one line naming the extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

OPTIONAL = ("msgpack", "websockets", "PIL", "sentencepiece", "triton", "transformers", "ray", "openpi_client",
            "libero", "robosuite", "mujoco", "imageio", "pyarrow", "av")
COMMANDS = ("layers", "verify", "quantize", "report", "bench", "serve", "eval", "record")


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("block")
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {OPTIONAL!r}
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
                return None
        sys.meta_path.insert(0, _Block())
    """))
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([str(site), src, env.get("PYTHONPATH", "")])
    return env


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_blocker_really_blocks(blocked_env):
    r = _run(blocked_env, "-c", "import msgpack")
    assert r.returncode != 0 and "blocked by the test" in r.stderr


def test_import_and_help_on_core_install(blocked_env):
    r = _run(blocked_env, "-c", "import duquant, duquant.cli, duquant.models, duquant.api, duquant.report; "
                                "print(duquant.quantize.__name__)")
    assert r.returncode == 0, r.stderr
    r = _run(blocked_env, "-m", "duquant.cli", "--help")
    assert r.returncode == 0, r.stderr
    for cmd in COMMANDS:
        assert cmd in r.stdout
    for cmd in COMMANDS:
        r = _run(blocked_env, "-m", "duquant.cli", cmd, "--help")
        assert r.returncode == 0, f"duquant {cmd} --help failed on the core install:\n{r.stderr}"
        assert "usage:" in r.stdout


def test_layers_runs_on_core_install(blocked_env):
    r = _run(blocked_env, "-m", "duquant.cli", "layers", "--config", "pi0", "--preset", "llm")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "Matched Linear layers: 126"


def test_serve_names_its_extra_in_one_line(blocked_env):
    r = _run(blocked_env, "-m", "duquant.cli", "serve", "--config", "pi0-tiny")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("duquant serve needs the serve extra") and 'pip install "duquant[serve]"' in lines[0]


def test_lerobot_dataset_calibration_names_its_extra_in_one_line(blocked_env, tmp_path):
    (tmp_path / "ds" / "meta").mkdir(parents=True)
    (tmp_path / "ds" / "meta" / "info.json").write_text('{"codebase_version": "v3.0"}')
    r = _run(blocked_env, "-m", "duquant.cli", "quantize", "--config", "pi0-tiny", "--calib", str(tmp_path / "ds"),
             "--packdir", str(tmp_path / "packs"), "--no-eval")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("duquant quantize needs the lerobot-data extra")
    assert 'pip install "duquant[lerobot-data]"' in lines[0]
