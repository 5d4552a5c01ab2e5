"""The malloc tuning (backend/memory.py) that keeps the server's memory flat under concurrent requests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")

# Eight threads allocate at once and hold what they got; glibc then prints one "Arena N:" block per arena it made.
ARENAS_AFTER_THREADS = """
import ctypes, ctypes.util, threading
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

# A 2 MiB block is allocated and freed, then another: prints whether that one was mmapped (mallinfo2's hblks).
MAPPED_AFTER_REUSE = """
import ctypes, ctypes.util
{setup}
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.free(ctypes.c_void_p(libc.malloc(2 << 20)))
before = libc.mallinfo2().hblks
block = libc.malloc(2 << 20)
print(libc.mallinfo2().hblks - before)
"""


def run(script: str, setup: str, **environment: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES} | environment | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script.format(setup=setup)], env=env, capture_output=True, text=True, check=True
    )


def arenas(setup: str, **environment: str) -> int:
    printed = run(ARENAS_AFTER_THREADS, setup, **environment).stderr
    return sum(line.startswith("Arena ") for line in printed.splitlines())


def mapped_blocks(setup: str, **environment: str) -> int:
    return int(run(MAPPED_AFTER_REUSE, setup, **environment).stdout)


TUNE = "from backend.memory import tune_malloc; print(','.join(tune_malloc()), file=__import__('sys').stderr)"


def test_two_arenas_for_a_threaded_process():
    assert arenas("") > 2  # glibc's default: an arena for each new thread, up to eight per core
    assert arenas(TUNE) == 2


def test_large_blocks_stay_mapped_after_one_is_freed():
    assert mapped_blocks("") == 0  # glibc's default: the free raised the threshold, the next block came from the heap
    assert mapped_blocks(TUNE) == 1


def test_the_cli_tunes_its_process_and_the_processes_it_starts():
    assert arenas("import backend.cli") == 2
    assert mapped_blocks("import backend.cli") == 1
    child = "import backend.cli, os; print(os.environ['MALLOC_ARENA_MAX'], os.environ['MALLOC_MMAP_THRESHOLD_'])"
    assert run(child, "").stdout == "2 1048576\n"


def test_variables_the_user_set_win():
    assert arenas(TUNE, MALLOC_ARENA_MAX="3") == 3
    assert mapped_blocks(TUNE, MALLOC_MMAP_THRESHOLD_="4194304") == 0  # 2 MiB is under the user's threshold
    tuned = run(ARENAS_AFTER_THREADS, TUNE, MALLOC_ARENA_MAX="3").stderr.splitlines()[0]
    assert tuned == "MALLOC_MMAP_THRESHOLD_"
