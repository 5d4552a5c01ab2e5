"""glibc's malloc tuned at process start, so that memory stays flat under concurrent requests.

Two habits of glibc's malloc made the server's resident memory creep up from round to round of concurrent requests
(docs/benchmarks.md, Memory):
- it gives each thread that allocates an arena of its own, up to eight per core, and returns little of them;
- after a large block is freed it raises its mmap threshold (up to 32 MB), so the images, masks and polygon buffers of
  later requests come from the heap, where they fragment it, rather than from mappings that go back on free.
Two arenas and a fixed 1 MiB threshold keep it flat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ARENAS = 2
MMAP_THRESHOLD = 1 << 20  # bytes
# mallopt's parameter numbers, from glibc's malloc.h, and the variables glibc itself reads at start for them
_OPTIONS = {-8: ("MALLOC_ARENA_MAX", ARENAS), -3: ("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)}


def tune_malloc() -> list[str]:
    """Sets two malloc arenas and a fixed 1 MiB mmap threshold in this process, and the same variables for the
    processes it starts. A variable the user set wins: glibc has read it already, and it is left as it is.

    Returns the variables set here (none on a C library without glibc's mallopt). Call it first thing, before other
    threads allocate: glibc fixes the number of arenas once it has made eight.
    """
    library = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None) if library else None
    tuned = []
    for parameter, (variable, value) in _OPTIONS.items():
        if variable in os.environ or mallopt is None:
            continue
        os.environ[variable] = str(value)
        if mallopt(parameter, value) == 1:
            tuned.append(variable)
    return tuned
