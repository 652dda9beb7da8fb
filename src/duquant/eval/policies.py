"""Policy clients of the evaluation: an openpi-compatible server (`ws://HOST:PORT`, several comma-separated to
spread the units of work over them), an in-process policy (`local:` / `local+duquant:`, torch imported only
when one is built) or the stub (`stub:`, fixed actions after `DUQUANT_STUB_INFER_S` seconds)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from duquant.eval.config import PolicyUnavailable, ServerError
from duquant.serve import wire

LOCAL_PREFIXES = ("local:", "local+duquant:")


def is_in_process(spec: str) -> bool:
    """A policy built inside the evaluation (a GPU actor under ray) rather than a server it connects to."""
    return spec.startswith(LOCAL_PREFIXES)


def server_list(spec: str) -> list[str]:
    """`ws://a:8000,ws://b:8000` -> both; an in-process or stub spec is one policy."""
    if is_in_process(spec) or spec.startswith("stub:"):
        return [spec]
    servers = [s.strip() for s in spec.split(",") if s.strip()]
    if not servers:
        raise ValueError(f"no policy server in {spec!r}; give ws://HOST:PORT[,ws://HOST:PORT...]")
    return servers


class WebsocketClient:
    """openpi's WebsocketClientPolicy without openpi: waits for the server (with a deadline), reconnects after
    the server closed the connection on a failed request."""

    def __init__(self, uri: str, connect_timeout: float = 300.0, api_key: str | None = None):
        self.uri = uri if uri.startswith(("ws://", "wss://")) else f"ws://{uri}"
        self.connect_timeout = connect_timeout
        self.api_key = api_key
        self._packer = wire.Packer()
        self._ws = None
        self.metadata = self._connect()

    def _connect(self) -> dict:
        from websockets.sync.client import connect

        deadline = time.monotonic() + self.connect_timeout
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        while True:
            try:
                self._ws = connect(self.uri, compression=None, max_size=None, additional_headers=headers,
                                   open_timeout=max(1.0, min(30.0, deadline - time.monotonic())))
                if hasattr(self._ws, "pending_legacy_warning"):  # websockets >= 17.1: we close it ourselves
                    self._ws.pending_legacy_warning = False
                return wire.unpackb(self._ws.recv())
            except (OSError, TimeoutError) as err:
                if time.monotonic() > deadline:
                    raise PolicyUnavailable(
                        f"no policy server at {self.uri} after {self.connect_timeout:.0f} s ({err})"
                    ) from err
                time.sleep(1.0)

    def infer(self, obs: dict) -> dict:
        import websockets

        if self._ws is None:
            self.metadata = self._connect()
        try:
            self._ws.send(self._packer.pack(obs))
            reply = self._ws.recv()
        except (websockets.ConnectionClosed, OSError) as err:
            self._ws = None
            raise PolicyUnavailable(f"lost the connection to {self.uri}: {err}") from err
        if isinstance(reply, str):
            self.close()  # the server closes with 1011 after an error frame; reconnect on the next call
            raise ServerError(f"Error in inference server:\n{reply}")
        return wire.unpackb(reply)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
            self._ws = None


def close_policies(policies: dict) -> None:
    """Close every policy client that holds a connection (in-process policies have nothing to close)."""
    for p in policies.values():
        if hasattr(p, "close"):
            p.close()


def make_policy(spec: str, connect_timeout: float = 300.0):
    """`ws://host:port` or `host:port`: a server; `local:CONFIG_OR_CHECKPOINT_DIR`: in-process float;
    `local+duquant:CONFIG_OR_CHECKPOINT_DIR`: in-process, quantized as the OPENPI_DUQUANT_* variables say."""
    if spec.startswith("stub:"):
        from duquant.eval.stub import StubPolicy

        return StubPolicy()
    for prefix in LOCAL_PREFIXES:
        if spec.startswith(prefix):
            from duquant.serve.policy import PolicySpec, create_policy

            target = spec[len(prefix):]
            quant = None
            if prefix == "local+duquant:":
                from duquant.config import DuQuantConfig

                quant = DuQuantConfig.from_env()
            is_dir = Path(target).exists()
            return create_policy(
                PolicySpec(
                    config=None if is_dir else target,
                    checkpoint=target if is_dir else None,
                    quantize=quant,
                    tokenizer=os.environ.get("DUQUANT_TOKENIZER"),
                )
            )
    return WebsocketClient(spec, connect_timeout=connect_timeout)


__all__ = ["WebsocketClient", "make_policy", "server_list", "is_in_process", "LOCAL_PREFIXES"]
