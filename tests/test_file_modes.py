"""Pack and observation files get the mode the umask gives any file of the user (not mkstemp's / safetensors'
0600), so a server running as another user can read them."""

import os
import stat

import pytest
import torch

from duquant.models import build_policy, make_synthetic_observation, save_observations
from duquant.packs import PackStore


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = PackStore(tmp_path / "packs")
        pack = store.save("layers.0.q_proj", {"w": torch.zeros(3)}, {})
        store.write_manifest({"layers.0.q_proj": {}})
        cfg = build_policy("pi0-tiny", device="meta").config
        obs = make_synthetic_observation(cfg, 1)
        files = [pack, tmp_path / "packs" / "manifest.json", save_observations(tmp_path / "o.safetensors", obs),
                 save_observations(tmp_path / "o.npz", obs)]
    finally:
        os.umask(old)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
