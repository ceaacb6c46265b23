"""CPU replicas keep the memory they free, for the next render (glibc's malloc).

glibc serves a large allocation (past its mmap threshold, at most 32 MiB) with fresh
pages from the kernel and returns them when it is freed, and a thread other than the
main one allocates from an arena whose heaps are unmapped once empty. A CPU engine
allocates and frees activations of tens of MiB at every layer, so every render faulted
its working set in again, page by page, zeroed by the kernel; with these settings it
does not (measured with `benchmarks/farm_overhead.py`: benchmarks/RESULTS.md).

The settings are glibc tunables, read when a process starts, so they travel in the
replica's environment: one arena, no mmap for large blocks, no trimming of the heap. The
process then holds its peak memory between renders, which the next render needs anyway.
Other C libraries ignore the variable. An operator's own GLIBC_TUNABLES is left alone.
"""

from __future__ import annotations

import os

KEEP_FREED_MEMORY = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def allocator_env() -> dict[str, str]:
    """Environment variables for a CPU replica's process."""
    if "GLIBC_TUNABLES" in os.environ:
        return {}
    return {"GLIBC_TUNABLES": KEEP_FREED_MEMORY}
