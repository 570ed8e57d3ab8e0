"""Shared timing helper for the benchmarks."""

from __future__ import annotations

import time


class Timer:
    """Wall and process-CPU seconds: on a shared machine CPU time is what this process actually got."""

    def __enter__(self) -> "Timer":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
