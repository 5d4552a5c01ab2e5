"""The malloc arena cap (backend/memory.py) that keeps the server's memory flat under concurrent requests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Eight threads allocate at once and hold what they got; glibc then prints one "Arena N:" block per arena it made.
ARENAS_AFTER_THREADS = """
import ctypes, ctypes.util, sys, threading
{setup}
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
start = threading.Barrier(8)
def allocate():
    start.wait()
    blocks = [libc.malloc(4096) for _ in range(200)]
    start.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


def arenas(setup: str, **environment: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | environment | {"PYTHONPATH": str(ROOT)}
    script = ARENAS_AFTER_THREADS.format(setup=setup)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_the_cap_keeps_a_threaded_process_at_two_arenas():
    assert arenas("") > 2  # glibc's default: an arena for each new thread, up to eight per core
    assert arenas("from backend.memory import cap_malloc_arenas; assert cap_malloc_arenas()") == 2


def test_the_cli_caps_its_process_and_the_processes_it_starts():
    assert arenas("import backend.cli") == 2
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | {"PYTHONPATH": str(ROOT)}
    child = "import backend.cli, os; print(os.environ['MALLOC_ARENA_MAX'])"
    assert subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True).stdout == "2\n"


def test_a_malloc_arena_max_the_user_set_wins():
    setup = "from backend.memory import cap_malloc_arenas; assert not cap_malloc_arenas()"
    assert arenas(setup, MALLOC_ARENA_MAX="3") == 3
