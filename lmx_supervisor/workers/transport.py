"""The supervisor's single ZeroMQ ROUTER socket.

Every worker connects a DEALER whose identity is its worker id; one receive
task decodes each frame once and hands it to whoever registered for that
identity. Sends never block the event loop: ROUTER_MANDATORY turns a send to
a peer that is gone into an error we can report instead of a silent drop.

Reads and sends go through the plain (not zmq.asyncio) socket. zmq.asyncio
spends a future, an fd registration and a failed read per message; a
streamed token is one message, and on a 2-core host every millisecond of
gateway CPU is taken from the model's decode threads. Here the event loop
watches the socket's fd once, and each wake-up drains what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

from lmx_protocol import FromWorker, StepFrames, decode_from_worker, encode
from lmx_protocol.messages import Frame
from lmx_supervisor.background import SupervisedTask
from lmx_supervisor.runtime_dirs import claim_runtime_dir, remove_stale_runtime_dirs

log = logging.getLogger("lmx.transport")

FrameHandler = Callable[[FromWorker], None]
# Raw frames of peers that are not workers (node agents, by identity prefix).
PeerHandler = Callable[[bytes, bytes], None]
# On a CURVE socket: may the peer whose key (its ZAP User-Id, Z85) this is
# send as this identity?
IdentityCheck = Callable[[bytes, str], bool]
# Frames read in one go before yielding to the event loop again (fairness to HTTP).
_DRAIN_LIMIT = 256
# An int, not the zmq.POLLIN flag enum: `&` on the enum builds enum objects per call.
_POLLIN = int(zmq.POLLIN)


class PeerGone(Exception):
    """The worker addressed is not connected (any more)."""


class RouterHub:
    def __init__(self, address: str | None = None, runtime_dir: str | None = None,
                 max_message_bytes: int = 256 * 1024 * 1024,
                 context: zmq.Context[Any] | None = None,
                 curve_server_keys: tuple[bytes, bytes] | None = None) -> None:
        """`context` and `curve_server_keys` (public, secret): a tcp socket
        that only CURVE clients the context's ZAP authenticator admits can
        talk to (lmx_supervisor.nodes); the context stays the caller's."""
        self._owned_dir: Path | None = None
        if address is None:
            base = Path(runtime_dir).expanduser() if runtime_dir else Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            # What a SIGKILLed gateway left behind (its socket dir).
            remove_stale_runtime_dirs(base)
            # mkdtemp creates the directory 0700: only this user may connect.
            self._owned_dir = Path(tempfile.mkdtemp(prefix="lmx-", dir=base))
            claim_runtime_dir(self._owned_dir)
            address = f"ipc://{self._owned_dir / 'supervisor.sock'}"
        self._owns_ctx = context is None
        self._ctx: zmq.Context[Any] = zmq.Context() if context is None else context
        # A plain socket even on a zmq.asyncio context: every read and send
        # is non-blocking, and the receive loop watches the fd itself.
        self._sock: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.ROUTER)
        if curve_server_keys is not None:
            self._sock.curve_server = True
            self._sock.curve_publickey, self._sock.curve_secretkey = curve_server_keys
            # A peer behind a cut link is dropped and may reconnect.
            self._sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        # A peer sending more than this is disconnected before its bytes
        # are buffered: no frame may exhaust the gateway's memory.
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.bind(address)
        # What the receive loop sleeps on; resolved when the socket's fd
        # turns readable (or a send may have taken the fd's signal).
        self._wake: asyncio.Future[None] | None = None
        # tcp://*:0 binds a random port; report what was really bound.
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._handlers: dict[bytes, FrameHandler] = {}
        self._peer_handlers: dict[bytes, PeerHandler] = {}
        # Set on a CURVE socket (lmx_supervisor.nodes): every message is
        # checked against the key its sender authenticated with.
        self.identity_check: IdentityCheck | None = None
        loop = self._receive_loop if curve_server_keys is None else self._receive_checked_loop
        self._task = SupervisedTask("frame router", loop)
        # Messages that were not [identity, frame] or did not decode; the
        # gateway exports it (lmx_router_malformed_frames_total).
        self.malformed_frames = 0

    def start(self) -> None:
        self._task.start()

    def problems(self) -> list[str]:
        problem = self._task.problem()
        return [problem] if problem else []

    def register(self, worker_id: str, handler: FrameHandler) -> None:
        self._handlers[worker_id.encode()] = handler

    def register_peers(self, identity_prefix: bytes, handler: PeerHandler) -> None:
        """Raw [identity, payload] of every peer whose identity starts with
        `identity_prefix` (frames of another protocol than the workers')."""
        self._peer_handlers[identity_prefix] = handler

    def send_raw(self, identity: bytes, payload: bytes) -> None:
        try:
            self._send([identity, payload])
        except zmq.ZMQError as exc:
            raise PeerGone(f"peer {identity[:64]!r} is not reachable: {exc}") from exc

    def unregister(self, worker_id: str) -> None:
        self._handlers.pop(worker_id.encode(), None)

    def send(self, worker_id: str, frame: Frame) -> None:
        try:
            self._send([worker_id.encode(), encode(frame)])
        except zmq.ZMQError as exc:  # EHOSTUNREACH under ROUTER_MANDATORY, or EAGAIN
            raise PeerGone(f"worker {worker_id} is not reachable: {exc}") from exc

    def _send(self, parts: list[bytes]) -> None:
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK)
        finally:
            # A send may process the socket's pending commands and with them
            # the fd's signal for a message that arrived meanwhile: the
            # receive loop must look again, or that message waits for the next.
            self._wake_up()

    def _wake_up(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _has_message(self) -> bool:
        # Reading EVENTS also re-arms the fd: it signals edges, not levels.
        events: int = self._sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        return bool(events & _POLLIN)

    async def _watching_fd(self, read: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        fd = self._sock.fileno()
        loop.add_reader(fd, self._wake_up)
        try:
            while True:
                # A batched decode step sends one frame per sequence at once:
                # read what is queued without a trip through the event loop each.
                for _ in range(_DRAIN_LIMIT):
                    if not self._has_message():
                        break
                    read()
                else:
                    await asyncio.sleep(0)  # let HTTP run, then read on
                    continue
                # EVENTS said "nothing" just now and nothing ran since: a
                # message arriving from here on raises the fd, and the loop
                # calls _wake_up.
                self._wake = loop.create_future()
                await self._wake
        finally:
            self._wake = None
            loop.remove_reader(fd)

    async def _receive_loop(self) -> None:
        await self._watching_fd(
            lambda: self._dispatch(self._sock.recv_multipart(zmq.NOBLOCK)))

    async def _receive_checked_loop(self) -> None:
        """As _receive_loop, with each message's sender key (read from the
        frame metadata, hence copy=False) checked against its identity: an
        authorized node must not speak as another node or its workers."""
        await self._watching_fd(self._read_checked)

    def _read_checked(self) -> None:
        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
        user_id = str(frames[0].get("User-Id")) if frames else ""
        data = [frame.bytes for frame in frames]
        check = self.identity_check
        if check is not None and data and not check(data[0], user_id):
            self._malformed(data[0], f"sent with key {user_id}, not its own")
            return
        self._dispatch(data)

    def _dispatch(self, frames: list[bytes]) -> None:
        # Anything may arrive on the socket (a foreign DEALER, a buggy peer):
        # a message that is not [identity, frame] is logged and dropped,
        # never allowed to end the loop every request depends on.
        if len(frames) != 2:
            self._malformed(frames[0] if frames else b"", f"{len(frames)} parts, expected 2")
            return
        identity, payload = frames
        for prefix, peer_handler in self._peer_handlers.items():
            if identity.startswith(prefix):
                try:
                    peer_handler(identity, payload)
                except Exception:
                    log.exception("peer handler for %r failed", identity[:64])
                return
        handler = self._handlers.get(identity)
        if handler is None:
            log.debug("frame from unknown worker %r dropped", identity)
            return
        try:
            frame = decode_from_worker(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed(identity, f"undecodable: {exc}")
            return
        # A batched decode step's frames arrive as one message; each goes to
        # the handler as if it had come alone, in the worker's order.
        for one in frame.frames if isinstance(frame, StepFrames) else (frame,):
            try:
                handler(one)
            except Exception:  # one handler's bug must not stop all routing
                log.exception("frame handler for %r failed", identity)

    def _malformed(self, identity: bytes, why: str) -> None:
        self.malformed_frames += 1
        log.error("malformed message from peer %r dropped: %s", identity[:64], why)

    async def close(self) -> None:
        await self._task.stop()
        self._sock.close(linger=0)
        if self._owns_ctx:
            self._ctx.term()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None

    def __del__(self) -> None:
        if self._owned_dir is not None and os.path.isdir(self._owned_dir):
            shutil.rmtree(self._owned_dir, ignore_errors=True)
