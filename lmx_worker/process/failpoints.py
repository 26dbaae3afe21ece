"""Faults a test can inject into a real worker on purpose.

Selected by the env var LMX_FAILPOINTS, a comma-separated list of
`MODEL_ID=POINT[:ARG]` (or `*=POINT` for every model), for example
`LMX_FAILPOINTS="flaky=segfault_on_load,slow=slow_tokens:50"`. Keyed by
model id so one gateway can host a broken model beside healthy ones. A
target may also name a spawn setting, `MODEL_ID[parallel_slots=3]=POINT`:
then only workers spawned with that value get the point (so a test can
break a restart's replacement and not the worker it replaces).

Points:
  crash_on_load       raise an exception while loading (clean Failed frame)
  segfault_on_load    dereference NULL while loading (dies with SIGSEGV)
  hang_on_load        never finish loading
  slow_load:MS        sleep MS milliseconds before loading
  load_after_file:PATH  wait (up to LOAD_GATE_MAX_SEC) until PATH exists before
                      loading, so a test decides when a load may finish
  exit_mid_stream:N   os._exit(70) after emitting N tokens of a request
  slow_tokens:MS      sleep MS milliseconds before every token
  fail_generate       refuse every generation (so the warm-up canary fails)
  alloc_mid_stream:MB once a request has emitted a token, allocate (and touch)
                      MB MiB more before every token, until the worker's
                      memory cap stops it with a MemoryError. Without a cap
                      it stops at ALLOC_CEILING and merely holds that much.
  slow_encode:MS      sleep MS milliseconds before every embedding/rerank
                      batch (so concurrent requests pile up into one batch)
  segfault_on_prompt:MARKER
                      dereference NULL (a real SIGSEGV) when a generation's
                      prompt or any chat message contains MARKER: a poison
                      request, as a native bug in templating or decoding
                      would make one
  step_error_on_prompt:MARKER
                      once a prompt containing MARKER is admitted, the next
                      decode step raises (an error no request can be blamed
                      for: the worker fails that step's requests and resets)
  stall_on_prompt:MARKER
                      block the decode loop for good (the heartbeat thread
                      keeps beating) when a prompt contains MARKER: a worker
                      alive but stuck
"""

from __future__ import annotations

import ctypes
import os
import resource
import time
from collections.abc import Mapping

import msgspec

from lmx_protocol import Generate
from lmx_worker.process.spec import WorkerSpec

ENV_VAR = "LMX_FAILPOINTS"
# alloc_mid_stream never takes more than this from a worker that has no
# memory cap: a test run without caps must not exhaust the host.
ALLOC_CEILING = 2 * 1024**3
LOAD_GATE_MAX_SEC = 300.0


def _split_item(item: str) -> tuple[str, str]:
    """`TARGET=POINT`, where TARGET may hold `[key=value]`."""
    bracket, equals = item.find("["), item.find("=")
    if bracket != -1 and (equals == -1 or bracket < equals) and "]" in item:
        close = item.index("]")
        return item[:close + 1], item[close + 1:].removeprefix("=")
    target, _, spec = item.partition("=")
    return target, spec


def _targets(target: str, model_id: str, settings: Mapping[str, object]) -> bool:
    name, _, condition = target.partition("[")
    if name not in (model_id, "*"):
        return False
    if not condition:
        return True
    key, _, value = condition.removesuffix("]").partition("=")
    return key in settings and str(settings[key]) == value


class Failpoints:
    def __init__(self, points: dict[str, str]) -> None:
        self._points = points
        self._hoard: list[bytes] = []
        self._hoarded = 0
        self._step_error_armed = False

    @classmethod
    def for_spec(cls, spec: WorkerSpec) -> Failpoints:
        return cls.from_env(spec.model_id, settings=msgspec.structs.asdict(spec))

    @classmethod
    def from_env(cls, model_id: str, env: dict[str, str] | None = None,
                 settings: Mapping[str, object] | None = None) -> Failpoints:
        raw = (env if env is not None else dict(os.environ)).get(ENV_VAR, "")
        points: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in raw.split(","))):
            target, spec = _split_item(item)
            if not _targets(target, model_id, settings or {}):
                continue
            name, _, arg = spec.partition(":")
            points[name] = arg
        return cls(points)

    def __bool__(self) -> bool:
        return bool(self._points)

    def on_load(self) -> None:
        slow = self._points.get("slow_load")
        if slow:
            time.sleep(int(slow) / 1000.0)
        gate = self._points.get("load_after_file")
        if gate:
            deadline = time.monotonic() + LOAD_GATE_MAX_SEC
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.05)
        if "crash_on_load" in self._points:
            raise RuntimeError("failpoint crash_on_load")
        if "segfault_on_load" in self._points:
            ctypes.string_at(0)  # a real SIGSEGV, not a simulated exit code
        if "hang_on_load" in self._points:
            while True:
                time.sleep(3600)

    def before_token(self, tokens_emitted: int) -> None:
        if self._step_error_armed:
            self._step_error_armed = False
            raise RuntimeError("failpoint step_error_on_prompt")
        slow = self._points.get("slow_tokens")
        if slow:
            time.sleep(int(slow) / 1000.0)
        limit = self._points.get("exit_mid_stream")
        if limit is not None and tokens_emitted >= int(limit or "1"):
            os._exit(70)
        grow = self._points.get("alloc_mid_stream")
        if grow is not None and tokens_emitted >= 1:
            self._allocate(int(grow or "64") * 1024 * 1024)

    def before_encode(self) -> None:
        slow = self._points.get("slow_encode")
        if slow:
            time.sleep(int(slow) / 1000.0)

    def on_generate(self, request: Generate) -> None:
        poison = self._points.get("segfault_on_prompt")
        if poison and _mentions(request, poison):
            ctypes.string_at(0)
        step_error = self._points.get("step_error_on_prompt")
        if step_error and _mentions(request, step_error):
            self._step_error_armed = True
        stall = self._points.get("stall_on_prompt")
        if stall and _mentions(request, stall):
            while True:
                time.sleep(3600)

    @property
    def fails_generate(self) -> bool:
        return "fail_generate" in self._points

    def _allocate(self, size: int) -> None:
        capped = any(resource.getrlimit(r)[0] != resource.RLIM_INFINITY
                     for r in (resource.RLIMIT_DATA, resource.RLIMIT_AS))
        if not capped and self._hoarded + size > ALLOC_CEILING:
            return
        # Filled, not just reserved: the pages become resident, as a real
        # runaway's would. A MemoryError here propagates to the step loop.
        block = b"\x5a" * size
        self._hoard.append(block)
        self._hoarded += size


def _mentions(request: Generate, marker: str) -> bool:
    if request.prompt is not None and marker in request.prompt:
        return True
    return any(m.content is not None and marker in m.content for m in request.messages or [])
