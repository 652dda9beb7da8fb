"""An openpi-compatible WebSocket policy server (openpi `serving/websocket_policy_server.py` protocol).

Per connection: the server sends msgpack(metadata) first, then answers each binary msgpack request (an
observation dict) with msgpack(policy output + `server_timing` {infer_ms, prev_total_ms}). A request that
fails is answered as openpi does: one text frame holding the traceback, then close code 1011; other
connections are not affected. `GET /healthz` -> 200 "OK\\n" followed by one JSON line of counters (requests
served, errors, refused inputs, failed batches retried one by one, batches); the server listens only once the
policy is warm, so OK means ready. A request the policy refuses (`guards.InputError`: non-finite values, a
wrong state length, a malformed observation) is logged as one line; any other failure with its traceback.

Unlike openpi's server, inference runs on one worker thread, off the event loop (keepalive pings are answered
during long calls), requests from several connections go through a bounded queue (a full queue makes senders
wait), and with `batch_window_ms > 0` requests arriving within the window are run as one batch (up to
`max_batch`), so parallel evaluation workers share the GPU. Requests larger than `max_request_bytes` are
refused by the WebSocket layer (close code 1009). SIGINT / SIGTERM stop accepting, let running requests
finish, and exit.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import signal
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import CloseCode

from duquant.serve import wire
from duquant.serve.guards import InputError

logger = logging.getLogger("duquant.serve")
ERROR_REASON = "Internal server error. Traceback included in previous frame."


def _health_check(stats: dict):
    def check(connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n" + json.dumps(stats, sort_keys=True) + "\n")
        return None

    return check


class PolicyServer:
    def __init__(self, policy, host: str = "0.0.0.0", port: int = 8000, metadata: dict | None = None, *,
                 batch_window_ms: float = 0.0, max_batch: int = 8, max_queue: int = 64,
                 max_request_bytes: int | None = 64 << 20, warmup: bool = True):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if batch_window_ms < 0:
            raise ValueError("batch_window_ms must be >= 0")
        self.policy = policy
        self.host, self.port = host, port
        self.metadata = metadata if metadata is not None else dict(getattr(policy, "metadata", {}) or {})
        self.batch_window = batch_window_ms / 1000.0
        self.max_batch = max_batch if batch_window_ms > 0 else 1
        self.max_queue = max_queue
        self.max_request_bytes = max_request_bytes
        self.warmup = warmup
        self.bound_port: int | None = None
        self.stats = {"requests": 0, "errors": 0, "refused": 0, "batch_failures": 0, "batches": 0,
                      "max_batch_seen": 0}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duquant-infer")
        self._queue: asyncio.Queue | None = None

    # ---- inference, on the worker thread -------------------------------------------------------------------
    def _run_batch(self, observations: list[dict]) -> list:
        """Results (dicts) or exceptions, one per observation; a failing batch is retried one by one so only
        the bad request fails."""
        if len(observations) == 1:
            try:
                return [self.policy.infer(observations[0])]
            except Exception as err:  # noqa: BLE001 - handed to the request's connection
                return [err]
        try:
            return list(self.policy.infer_batch(observations))
        except Exception as err:  # noqa: BLE001
            self.stats["batch_failures"] += 1
            logger.warning("a batch of %d requests failed (%s: %s); running each alone so only the bad ones "
                           "fail (%d failed batches so far)", len(observations), type(err).__name__, err,
                           self.stats["batch_failures"])
            return [self._run_batch([o])[0] for o in observations]

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            if self.max_batch > 1:
                deadline = loop.time() + self.batch_window
                while len(items) < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        items.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except asyncio.TimeoutError:
                        break
            items = [(obs, fut) for obs, fut in items if not fut.done()]
            if not items:
                continue
            self.stats["batches"] += 1
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(items))
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [o for o, _ in items])
            except Exception as err:  # noqa: BLE001 - executor failure: every waiting request gets it
                results = [err] * len(items)
            for (_, fut), res in zip(items, results):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def _infer(self, obs: dict) -> dict:
        assert self._queue is not None
        fut = asyncio.get_running_loop().create_future()
        if self._queue.full():
            logger.warning("request queue full (%d); the sender waits", self.max_queue)
        await self._queue.put((obs, fut))
        return await fut

    # ---- one connection ------------------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        logger.info("connection from %s opened", peer)
        packer = wire.Packer()
        try:
            await ws.send(packer.pack(self.metadata))
        except websockets.ConnectionClosed:
            return
        prev_total = None
        while True:
            try:
                start = time.monotonic()
                message = await ws.recv()
                if isinstance(message, str):
                    raise InputError("expected a binary msgpack frame (an observation dict), got a text frame")
                try:
                    obs = wire.unpackb(message)
                except Exception as err:  # noqa: BLE001 - msgpack raises several types for bad bytes
                    raise InputError(f"the request is not a msgpack observation ({type(err).__name__}: {err})") \
                        from err
                if not isinstance(obs, dict):
                    raise InputError(f"an observation must be a msgpack map, got {type(obs).__name__}")
                infer_start = time.monotonic()
                result = await self._infer(obs)
                timing = {"infer_ms": (time.monotonic() - infer_start) * 1000}
                if prev_total is not None:
                    timing["prev_total_ms"] = prev_total * 1000
                result = dict(result)
                result["server_timing"] = timing
                await ws.send(packer.pack(result))
                self.stats["requests"] += 1
                prev_total = time.monotonic() - start
            except websockets.ConnectionClosed:
                logger.info("connection from %s closed", peer)
                break
            except Exception as err:  # noqa: BLE001 - answered as openpi does; other connections go on
                self.stats["errors"] += 1
                tb = traceback.format_exc()
                if isinstance(err, InputError):
                    self.stats["refused"] += 1
                    logger.warning("refused a request from %s: %s", peer, err)
                else:
                    logger.error("request from %s failed:\n%s", peer, tb)
                try:
                    await ws.send(tb)
                    await ws.close(code=CloseCode.INTERNAL_ERROR, reason=ERROR_REASON)
                except websockets.ConnectionClosed:
                    pass
                break

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def serve(
        self, ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """Warm up, listen, call `ready(port)`, serve until `stop` is set, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        if self.warmup and hasattr(self.policy, "warmup"):
            sizes = (1,) if self.max_batch == 1 else (1, self.max_batch)
            seconds = await loop.run_in_executor(self._executor, self.policy.warmup, sizes)
            logger.info("warm-up done in %.1f s (batch sizes %s)", seconds, sizes)
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        batcher = asyncio.create_task(self._batcher())
        try:
            async with serve(
                self._handler,
                self.host,
                self.port,
                compression=None,
                max_size=self.max_request_bytes,
                process_request=_health_check(self.stats),
            ) as server:
                self.bound_port = server.sockets[0].getsockname()[1]
                if ready is not None:
                    ready(self.bound_port)
                await stop.wait()
                logger.info("shutting down: closing connections")
        finally:
            batcher.cancel()
            try:
                await batcher
            except asyncio.CancelledError:
                pass
            self._executor.shutdown(wait=True, cancel_futures=True)

    def serve_forever(self, ready: Callable[[int], None] | None = None) -> None:
        """Blocking; SIGINT / SIGTERM end it cleanly."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, stop.set)
                except (NotImplementedError, RuntimeError):  # not the main thread / not supported
                    pass
            await self.serve(ready=ready, stop=stop)

        asyncio.run(main())


__all__ = ["PolicyServer"]
