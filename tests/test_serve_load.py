"""`duquant serve` under a bounded mixed load, over loopback: concurrent clients send valid, malformed,
non-finite and oversized requests. Every valid request gets the right actions, every bad one an error reply,
and the server process lives through it. The p50 / p95 latency of the valid requests is printed (not
asserted: no timed tests)."""

import contextlib
import json
import random
import threading
import time
import urllib.request

import numpy as np
import pytest

from duquant.serve import wire
from duquant.serve.policy import PolicySpec, create_policy
from test_serve import ServedPolicy, libero_obs

CLIENTS = 4
BAD_KINDS = ("text", "garbage", "missing_keys", "nan_state", "inf_image", "oversized")
MAX_REQUEST_MB = 1


def request_for(kind: str, obs: dict):
    """(payload, expected outcome) for one kind of request."""
    if kind == "valid":
        return wire.packb(obs), "actions"
    if kind == "text":
        return "not an observation", "error"
    if kind == "garbage":
        return b"\xc1\x00 not msgpack", "error"
    if kind == "missing_keys":
        return wire.packb({"prompt": "x"}), "error"
    if kind == "nan_state":
        state = np.array(obs["observation/state"], dtype=np.float64)
        state[2] = np.nan
        return wire.packb({**obs, "observation/state": state}), "error"
    if kind == "inf_image":
        img = np.array(obs["observation/image"], dtype=np.float32) / 255.0
        img[10, 10, 0] = np.inf
        return wire.packb({**obs, "observation/image": img}), "error"
    if kind == "oversized":
        return wire.packb({**obs, "junk": np.zeros(2 << 20, dtype=np.uint8)}), "too_big"
    raise ValueError(kind)


class Client:
    """One connection at a time; a bad request costs the connection (openpi's protocol), so reconnect."""

    def __init__(self, port: int):
        self.port = port
        self.ws = None
        self.stack = contextlib.ExitStack()

    def send(self, payload):
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        if self.ws is None:
            self.ws = self.stack.enter_context(
                connect(f"ws://127.0.0.1:{self.port}", max_size=None, compression=None, open_timeout=60))
            wire.unpackb(self.ws.recv(timeout=60))  # metadata
        try:
            self.ws.send(payload)
            reply = self.ws.recv(timeout=120)
        except ConnectionClosed as closed:
            self.ws = None
            return "closed", closed.rcvd.code if closed.rcvd else None
        if isinstance(reply, str):  # the traceback frame, then close 1011
            try:
                self.ws.recv(timeout=30)
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
            else:
                code = "not closed"
            self.ws = None
            return "error", (reply, code)
        return "actions", wire.unpackb(reply)

    def close(self):
        self.stack.close()


def test_mixed_concurrent_load_valid_answered_bad_refused_server_survives():
    pytest.importorskip("websockets")
    rng = random.Random(0)
    kinds = ["valid"] * 8 + [k for k in BAD_KINDS for _ in range(2)]
    rng.shuffle(kinds)
    per_client = [kinds[i::CLIENTS] for i in range(CLIENTS)]
    obs = libero_obs(3)
    server = ServedPolicy("--config", "pi0-tiny", "--noise-seed", "0", "--max-request-mb", str(MAX_REQUEST_MB),
                          "--batch-window-ms", "20", "--max-batch", "4")
    results: list[tuple[str, str, object, float]] = []
    lock = threading.Lock()

    def run(my_kinds):
        client = Client(server.port)
        try:
            for kind in my_kinds:
                payload, _ = request_for(kind, obs)
                start = time.monotonic()
                outcome, detail = client.send(payload)
                with lock:
                    results.append((kind, outcome, detail, time.monotonic() - start))
        finally:
            client.close()

    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in per_client]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        assert server.proc.poll() is None, "".join(server.lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as r:
            first, counters = r.read().decode().split("\n", 1)
        counters = json.loads(counters)
    finally:
        code = server.stop()
    assert code == 0, "".join(server.lines)
    assert len(results) == len(kinds)

    # every valid request: the actions of the one float policy with the seeded noise stream. Concurrency decides
    # which request gets which draw, so the replies must equal the first n draws as a multiset.
    valid = [detail["actions"] for kind, outcome, detail, _ in results if kind == "valid" and outcome == "actions"]
    bad_answers = [(kind, outcome, detail) for kind, outcome, detail, _ in results if kind != "valid"]
    assert len(valid) == kinds.count("valid"), [(k, o) for k, o, _, _ in results]
    reference = create_policy(PolicySpec(config="pi0-tiny", noise_seed=0))
    expected = [r["actions"] for r in reference.infer_batch([obs] * len(valid))]  # draws as n single calls
    for actions in valid:
        match = [i for i, e in enumerate(expected) if np.allclose(actions, e, atol=1e-4)]
        assert match, "a valid request got actions no float policy call gives"
        expected.pop(match[0])

    for kind, outcome, detail in bad_answers:
        if kind == "oversized":
            assert (outcome, detail) == ("closed", 1009), (kind, outcome, detail)
        else:
            assert outcome == "error" and detail[1] == 1011, (kind, outcome, detail)
    nonfinite = [d[0] for k, _, d in bad_answers if k in ("nan_state", "inf_image")]
    assert all("non-finite" in text for text in nonfinite)

    assert first == "OK"
    refused = sum(1 for k in kinds if k not in ("valid", "oversized"))
    assert counters["requests"] == len(valid) and counters["refused"] == refused == counters["errors"]
    log = "".join(server.lines)
    assert log.count("refused a request") == refused and "Traceback" not in log

    latencies = sorted(ms for kind, _, _, ms in results if kind == "valid")
    p50, p95 = np.percentile(latencies, 50) * 1000, np.percentile(latencies, 95) * 1000
    print(f"\nmixed load: {len(kinds)} requests from {CLIENTS} clients, {len(valid)} valid: "
          f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms; server counters {counters}")
