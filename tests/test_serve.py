"""`duquant serve`: the wire format, openpi's LIBERO transforms, and the server against the real
openpi-client."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from duquant.serve import wire
from duquant.serve.policy import (
    ModelPolicy,
    NormStats,
    PolicySpec,
    Transforms,
    create_policy,
    normalize,
    unnormalize,
)


def libero_obs(seed=0, float_images=False):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    if float_images:
        img, wrist = img / 255.0, wrist / 255.0
    return {"observation/image": img, "observation/wrist_image": wrist,
            "observation/state": rng.random(8), "prompt": "pick up the black bowl and place it on the plate"}


def stats(dim, seed):
    rng = np.random.default_rng(seed)
    q01 = -rng.random(dim) - 0.5
    return NormStats(
        mean=rng.normal(size=dim), std=rng.random(dim) + 0.5, q01=q01, q99=q01 + rng.random(dim) + 1
    )


# ---- wire --------------------------------------------------------------------------------------------------

def test_wire_matches_openpi_client_bytes_both_ways():
    msgpack_numpy = pytest.importorskip("openpi_client.msgpack_numpy")
    obj = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.float32(1.5), "c": np.int64(3),
           "d": np.zeros((2, 2), dtype=np.uint8)[:, ::-1], "e": [1, "x", {"f": np.array(["ab", "c"])}],
           "g": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
    ours = wire.packb(obj)
    assert ours == msgpack_numpy.packb(obj)
    back = msgpack_numpy.unpackb(ours)
    np.testing.assert_array_equal(back["g"], obj["g"])
    mine = wire.unpackb(msgpack_numpy.packb(obj))
    for k in ("a", "d", "g"):
        np.testing.assert_array_equal(mine[k], obj[k])
        assert mine[k].dtype == obj[k].dtype
    assert mine["b"] == np.float32(1.5) and mine["b"].dtype == np.float32
    assert not mine["a"].flags.writeable  # zero-copy, like openpi's


def test_wire_refuses_object_complex_and_bad_sizes():
    with pytest.raises(ValueError, match="Unsupported dtype"):
        wire.packb({"x": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="Unsupported dtype"):
        wire.packb(np.complex64(1j))
    import msgpack

    bad = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 7, b"dtype": "<f4", b"shape": [2]})
    with pytest.raises(ValueError, match="needs 8 bytes"):
        wire.unpackb(bad)
    evil = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]})
    with pytest.raises(ValueError, match="Unsupported dtype"):
        wire.unpackb(evil)


def test_resize_with_pad_matches_openpi_client():
    image_tools = pytest.importorskip("openpi_client.image_tools")
    rng = np.random.default_rng(0)
    for shape in [(256, 256, 3), (2, 180, 320, 3), (100, 60, 3)]:
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(
            wire.resize_with_pad(x, 224, 224), image_tools.resize_with_pad(x, 224, 224)
        )
    x = rng.random((5, 5, 3))
    np.testing.assert_array_equal(wire.convert_to_uint8(x), image_tools.convert_to_uint8(x))


# ---- transforms --------------------------------------------------------------------------------------------

def test_normalization_formulas_match_openpi():
    s = stats(8, 0)
    x = np.random.default_rng(1).normal(size=8)
    np.testing.assert_allclose(normalize(x, s, False), (x - s.mean) / (s.std + 1e-6))
    np.testing.assert_allclose(normalize(x, s, True), (x - s.q01) / (s.q99 - s.q01 + 1e-6) * 2 - 1)
    for q in (False, True):
        np.testing.assert_allclose(unnormalize(normalize(x, s, q), s, q), x, atol=1e-12)
    # unnormalising a 32-dim model output with 7-dim stats: z-score pads mean 0 / std 1, quantile passes the
    # rest
    a = np.random.default_rng(2).normal(size=(4, 32))
    s7 = stats(7, 3)
    z = unnormalize(a, s7, False)
    np.testing.assert_allclose(z[:, :7], a[:, :7] * (s7.std + 1e-6) + s7.mean)
    np.testing.assert_allclose(z[:, 7:], a[:, 7:] * (1 + 1e-6))
    qq = unnormalize(a, s7, True)
    np.testing.assert_allclose(qq[:, 7:], a[:, 7:])


@pytest.fixture(scope="module")
def pi0_tiny():
    from duquant.models import build_policy

    return build_policy("pi0-tiny")


def test_libero_transforms_end_to_end_by_hand(pi0_tiny):
    """The reply equals the model's output pushed through openpi's output transforms, computed
    independently."""
    import torch

    st, ac = stats(8, 1), stats(7, 2)
    pol = ModelPolicy(pi0_tiny, Transforms.for_libero(pi05=False), norm_stats={"state": st, "actions": ac})
    obs = libero_obs(3)
    noise = np.random.default_rng(4).normal(size=(50, 32)).astype(np.float32)
    out = pol.infer(obs, noise=noise)
    assert set(out) == {"actions", "policy_timing"} and out["actions"].shape == (50, 7)

    prepared = pol.prepare(obs)
    state_n = (obs["observation/state"] - st.mean) / (st.std + 1e-6)
    np.testing.assert_allclose(prepared["state"][:8], state_n)
    assert prepared["state"].shape == (32,) and not prepared["state"][8:].any()
    assert prepared["image_mask"] == {
        "base_0_rgb": True,
        "left_wrist_0_rgb": True,
        "right_wrist_0_rgb": False,
    }
    assert not prepared["image"]["right_wrist_0_rgb"].any()
    o = pol.pre.to_observation([prepared])
    np.testing.assert_allclose(o.images["base_0_rgb"][0, :, 5, 7].numpy(),
                               obs["observation/image"][5, 7].astype(np.float32) / 255 * 2 - 1, rtol=1e-6)
    raw = pi0_tiny.sample_actions(o, noise=torch.from_numpy(noise)[None]).numpy()[0]
    expected = raw[:, :7] * (ac.std + 1e-6) + ac.mean
    expected[:, :6] += obs["observation/state"][:6]  # pi0_libero's extra delta transform
    np.testing.assert_allclose(out["actions"], expected, rtol=1e-5, atol=1e-5)

    # float CHW images are accepted as openpi's _parse_image does
    chw = dict(obs, **{k: np.transpose(obs[k] / 255.0, (2, 0, 1)) for k in ("observation/image",
                                                                           "observation/wrist_image")})
    np.testing.assert_allclose(pol.infer(chw, noise=noise)["actions"],
                               pol.infer(dict(obs, **{k: ((obs[k] / 255.0) * 255).astype(np.uint8) for k in
                                                      ("observation/image", "observation/wrist_image")}),
                                         noise=noise)["actions"])


def test_pi05_libero_uses_quantiles_and_no_delta():
    from duquant.models import build_policy

    model = build_policy("pi05-tiny")
    t = Transforms.for_libero(pi05=True)
    assert t.use_quantiles and t.delta_action_dims == 0 and not t.discrete_state_input
    ac = stats(7, 5)
    pol = ModelPolicy(model, t, norm_stats={"state": stats(8, 6), "actions": ac})
    noise = np.zeros((50, 32), dtype=np.float32)
    out = pol.infer(libero_obs(1), noise=noise)["actions"]
    import torch

    raw = model.sample_actions(
        pol.pre.to_observation([pol.prepare(libero_obs(1))]), noise=torch.from_numpy(noise)[None]
    ).numpy()[0]
    np.testing.assert_allclose(
        out, (raw[:, :7] + 1) / 2 * (ac.q99 - ac.q01 + 1e-6) + ac.q01, rtol=1e-5, atol=1e-5
    )
    # no state reaches pi0.5 without discrete state input: a different state gives the same actions
    other = dict(libero_obs(1), **{"observation/state": np.ones(8) * 5})
    np.testing.assert_allclose(pol.infer(other, noise=noise)["actions"], out)


def test_batch_equals_single_and_generic_policy(pi0_tiny):
    pol = ModelPolicy(pi0_tiny, Transforms.for_libero(False))
    noise = np.random.default_rng(0).normal(size=(3, 50, 32)).astype(np.float32)
    obs = [libero_obs(i) for i in range(3)]
    batched = pol.infer_batch(obs, noise=noise)
    for i in range(3):
        np.testing.assert_allclose(
            batched[i]["actions"], pol.infer(obs[i], noise=noise[i])["actions"], atol=1e-5
        )
    from duquant.serve.policy import GenericPolicy

    gen = GenericPolicy(pi0_tiny)
    out = gen.infer(
        {"image": {"base_0_rgb": obs[0]["observation/image"]}, "state": np.zeros(5), "prompt": "x"},
        noise=noise[0],
    )
    assert out["actions"].shape == (50, 32)
    with pytest.raises(ValueError, match="unknown camera"):
        gen.infer({"image": {"cam_high": obs[0]["observation/image"]}, "state": np.zeros(5), "prompt": "x"})


def test_seeded_noise_is_reproducible(pi0_tiny):
    a = ModelPolicy(pi0_tiny, Transforms.for_libero(False), noise_seed=3)
    b = ModelPolicy(pi0_tiny, Transforms.for_libero(False), noise_seed=3)
    a.warmup()  # warm-up must not consume the seeded stream
    np.testing.assert_array_equal(a.infer(libero_obs())["actions"], b.infer(libero_obs())["actions"])


def test_quantized_policy_when_engine_present():
    pytest.importorskip("duquant.api")
    from duquant.config import DuQuantConfig

    q = DuQuantConfig(rotation_steps=4, calib_steps=2).with_preset("llm")  # DuQuantConfig(preset=) alone selects all
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pol = create_policy(PolicySpec(config="pi0-tiny", quantize=q.replace(packdir=d), noise_seed=0))
        meta = pol.metadata["duquant"]["quantization"]
        assert meta["layers"] > 0 and meta["bits"] == "w4a8"
        flt = create_policy(PolicySpec(config="pi0-tiny", noise_seed=0))
        qa, fa = pol.infer(libero_obs())["actions"], flt.infer(libero_obs())["actions"]
        assert qa.shape == fa.shape == (50, 7) and np.isfinite(qa).all() and not np.array_equal(qa, fa)


# ---- the server, as a subprocess, against the real openpi-client -------------------------------------------

def _clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPI_DUQUANT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServedPolicy:
    def __init__(self, *args, timeout=120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "duquant.cli", "serve", "--port", "0", "--host",
                                      "127.0.0.1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=_clean_env())
        self.lines: list[str] = []
        self.port = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on ws://" in line:
                self.port = int(line.split("ws://")[1].split()[0].rsplit(":", 1)[1])
                break
        if self.port is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.mark.parametrize("config", ["pi0-tiny", "pi05-tiny"])
def test_served_policy_answers_openpi_client(config):
    client_mod = pytest.importorskip("openpi_client.websocket_client_policy")
    import websockets

    server = ServedPolicy("--config", config, "--noise-seed", "0")
    try:
        client = client_mod.WebsocketClientPolicy("127.0.0.1", server.port)
        meta = client.get_server_metadata()
        assert meta["duquant"]["model"] == config and meta["duquant"]["quantization"] is None
        horizon = meta["duquant"]["action_horizon"]
        out = client.infer(libero_obs())
        assert out["actions"].shape == (horizon, 7) and np.isfinite(out["actions"]).all()
        assert set(out["server_timing"]) == {"infer_ms"} and out["policy_timing"]["infer_ms"] > 0
        out2 = client.infer(libero_obs(1, float_images=True))
        assert "prev_total_ms" in out2["server_timing"] and out2["actions"].shape == (horizon, 7)

        bystander = client_mod.WebsocketClientPolicy("127.0.0.1", server.port)  # open during the failure
        with pytest.raises(RuntimeError, match="Error in inference server:(.|\n)*LIBERO observation lacks"):
            client.infer({"observation/image": np.zeros((4, 4), dtype=np.float32)})
        with pytest.raises(websockets.ConnectionClosedError, match="1011"):
            client.infer(libero_obs())
        assert bystander.infer(libero_obs())["actions"].shape == (horizon, 7)
        fresh = client_mod.WebsocketClientPolicy("127.0.0.1", server.port)
        assert fresh.infer(libero_obs())["actions"].shape == (horizon, 7)

        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
            first, counters = r.read().decode().split("\n", 1)
            assert r.status == 200 and first == "OK"
            assert json.loads(counters)["errors"] == 1 and json.loads(counters)["refused"] == 1
    finally:
        code = server.stop()
    assert code == 0, "".join(server.lines)
    assert any("stopped after" in line for line in server.lines)


# ---- the server in-process: batching, limits ---------------------------------------------------------------

class ThreadServer:
    def __init__(self, policy, **kwargs):
        from duquant.serve.server import PolicyServer

        self.server = PolicyServer(policy, host="127.0.0.1", port=0, **kwargs)
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stop_event = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(60)
        self.port = self.server.bound_port

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.stop_event = asyncio.Event()
        self.loop.run_until_complete(
            self.server.serve(ready=lambda port: self.ready.set(), stop=self.stop_event)
        )

    def close(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_dynamic_batching_serves_concurrent_clients(pi0_tiny):
    from duquant.eval.libero import WebsocketClient

    pol = ModelPolicy(pi0_tiny, Transforms.for_libero(False))
    srv = ThreadServer(pol, batch_window_ms=200, max_batch=4)
    try:
        results = [None] * 4

        def run(i):
            c = WebsocketClient(f"127.0.0.1:{srv.port}", connect_timeout=10)
            results[i] = c.infer(libero_obs(i))["actions"]
            c.close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r is not None and r.shape == (50, 7) for r in results)
        assert srv.server.stats["max_batch_seen"] > 1
    finally:
        srv.close()


def test_oversized_request_is_refused_and_server_goes_on(pi0_tiny):
    client_mod = pytest.importorskip("openpi_client.websocket_client_policy")
    import websockets

    srv = ThreadServer(
        ModelPolicy(pi0_tiny, Transforms.for_libero(False)), max_request_bytes=400_000, warmup=False
    )
    try:
        c = client_mod.WebsocketClientPolicy("127.0.0.1", srv.port)
        with pytest.raises(websockets.ConnectionClosedError, match="1009"):
            c.infer({**libero_obs(), "junk": np.zeros(1_000_000, dtype=np.uint8)})
        c2 = client_mod.WebsocketClientPolicy("127.0.0.1", srv.port)
        assert c2.infer(libero_obs())["actions"].shape == (50, 7)
    finally:
        srv.close()


def test_eval_client_and_wire_import_no_torch():
    code = ("import sys, duquant.eval.libero, duquant.eval.cli, duquant.eval.record, duquant.serve.wire; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=_clean_env())
