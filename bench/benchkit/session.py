"""What every bench run has: progress lines with the elapsed time, a scratch folder, and the
servers it started, stopped in reverse order when it ends."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


class Progress:
    """`say(message)`: one line, prefixed with the minutes and seconds since the run started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


class BenchSession:
    """A run's scratch folder (kept with `keep`, for its servers' logs and data) and its
    `stoppers`, called newest first by `close`."""

    def __init__(self, *, prefix: str, keep: bool) -> None:
        self.keep = keep
        self.scratch = Path(tempfile.mkdtemp(prefix=prefix))
        self.say = Progress()
        self.stoppers: list[Callable[[], None]] = []

    def close(self) -> None:
        for stop in reversed(self.stoppers):
            with contextlib.suppress(Exception):
                stop()
        self.stoppers.clear()
        if self.keep:
            self.say(f"scratch folder kept: {self.scratch}")
        else:
            shutil.rmtree(self.scratch, ignore_errors=True)
