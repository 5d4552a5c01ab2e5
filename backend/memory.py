"""glibc's malloc arenas capped at process start, so that memory stays flat under concurrent requests.

glibc gives each thread that allocates while another holds the main arena an arena of its own, up to eight per core,
and returns little of them to the system. The server's request threads and the model's threads allocate large,
short-lived buffers, so its resident memory crept up from round to round of concurrent requests (docs/benchmarks.md,
Memory). Two arenas keep it flat at the same latency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

DEFAULT_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def cap_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Caps this process's malloc arenas at `arenas` and sets MALLOC_ARENA_MAX for the processes it starts.

    A MALLOC_ARENA_MAX the user set wins: glibc has read it already, and it is left as it is. Returns whether this
    process's cap was set here (False on a C library without glibc's mallopt, or when the user's value stands).
    Call it first thing, before other threads allocate: glibc fixes the number of arenas once it has made eight.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None)
    return mallopt is not None and mallopt(_M_ARENA_MAX, arenas) == 1
