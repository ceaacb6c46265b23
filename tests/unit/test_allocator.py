"""farm.serve.allocator: the tunables glibc reads at start, checked for their effect
(glibc ignores a tunable it does not know, so a typo would pass silently)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from farm.serve.allocator import KEEP_FREED_MEMORY, allocator_env

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tunables")

# Allocates, writes and frees 48 MiB blocks (over glibc's largest mmap threshold) with
# malloc, as torch's CPU allocator does, in a thread that is not the main one, as a
# replica's render thread; prints the page faults of the last 10 rounds, after one.
CHILD = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rounds(count):
    for _ in range(count):
        block = libc.malloc(48 * 2**20)
        ctypes.memset(block, 1, 48 * 2**20)
        libc.free(block)
def measured():
    rounds(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(10)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=measured)
thread.start()
thread.join()
"""


def page_faults(env: dict[str, str]) -> int:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env
    out = subprocess.run([sys.executable, "-c", CHILD], env=environ, capture_output=True, text=True, timeout=60,
                         check=True)
    return int(out.stdout)


def test_kept_memory_is_not_faulted_in_again():
    pages_per_round = 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    default = page_faults({})
    kept = page_faults({"GLIBC_TUNABLES": KEEP_FREED_MEMORY})
    assert default >= 5 * pages_per_round, "glibc no longer returns large blocks: the tunables may be moot"
    assert kept < pages_per_round / 10, (kept, default)


def test_an_operators_own_tunables_are_left_alone(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert allocator_env() == {"GLIBC_TUNABLES": KEEP_FREED_MEMORY}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    assert allocator_env() == {}
