"""What loads when the server starts: auto_load, then the models the
previous run had loaded; neither in safe mode."""

from __future__ import annotations

import logging

from lmx_supervisor.lifecycle.runtime_state import CRASH_LOOP_WINDOW_SEC, StartupVerdict
from lmx_supervisor.supervisor import Supervisor
from lmx_supervisor.workers.spawn_settings import parse_overrides

log = logging.getLogger("lmx.supervisor")


async def startup_loads(supervisor: Supervisor, verdict: StartupVerdict) -> None:
    if verdict.safe_mode:
        log.error("crash_loop_detected: %d unclean starts within %gs (startup_count=%d); "
                  "starting in safe mode", verdict.unclean_starts_in_window,
                  CRASH_LOOP_WINDOW_SEC, verdict.startup_count)
        log.warning("auto_load_skipped_safe_mode: not loading models.auto_load nor the %d "
                    "model(s) loaded before (%s); load them by hand, or stop cleanly "
                    "(SIGTERM) to reset the crash-loop counter",
                    len(verdict.previous_models),
                    ", ".join(r.model_id for r in verdict.previous_models) or "none")
        supervisor.emit("crash_loop_detected", {
            "startup_count": verdict.startup_count,
            "unclean_starts": verdict.unclean_starts_in_window,
            "previous_models": [r.model_id for r in verdict.previous_models]})
        return
    await supervisor.auto_load()
    for record in verdict.previous_models:
        try:
            model, already = await supervisor.load(
                record.path, backend=record.backend,
                served_name=record.served_name or record.model_id,
                overrides=parse_overrides(record.settings, "settings"),
                confine=False,  # a path this server loaded before, from its own state file
                shards=record.shards)
            if not already:
                log.info("restored model %s from the previous run", model.model_id)
        except Exception as exc:  # one model that no longer loads must not stop the rest
            log.error("could not restore model %s (%s): %s", record.model_id, record.path, exc)
        finally:
            supervisor.runtime_state.restore_done(record.model_id)
    supervisor.lifecycle.sync()  # drop the ones that could not be restored
