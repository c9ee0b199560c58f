"""Wall time per step of a command, logged as it goes and saved as ``timings.json``."""
from __future__ import annotations

import contextlib
import logging
import resource
import time

from kernel.files import write_json

log = logging.getLogger(__name__)


class Timings:
    """``with timings.step("lgbm_full: fold 2"): ...`` records seconds per step, in order."""

    def __init__(self):
        self.steps: list[dict] = []
        self.started = time.time()

    @contextlib.contextmanager
    def step(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            seconds = time.time() - start
            self.steps.append({"step": name, "seconds": round(seconds, 3)})
            log.debug("step %s: %.1f s", name, seconds)

    def as_dict(self) -> dict:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        return {"steps": self.steps, "total_seconds": round(time.time() - self.started, 3),
                "peak_rss_gib": round(peak_kib / 2**20, 3)}

    def write(self, path) -> None:
        write_json(path, self.as_dict())
