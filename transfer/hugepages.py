"""Huge pages under registered host memory (``madvise(MADV_COLLAPSE)``, Linux >= 6.1).

A same-host DRAM READ is ``process_vm_readv`` through UCX's CMA transport: per call the
kernel looks up and pins every source page and copies into the destination. On 4 KiB
pages a 512 KiB piece is 128 lookups and pins; inside a 2 MiB transparent huge page, one.
vLLM's CPU KV cache is private anonymous memory that the allocator has already touched
as 4 KiB pages, so ``MADV_HUGEPAGE`` (future faults only) would change nothing there;
``MADV_COLLAPSE`` rebuilds the populated range as huge pages in place, synchronously,
keeping addresses and bytes. It is independent of the sysfs THP mode (``madvise`` here).

Best effort: called once at registration, before NIXL registers the memory (a pinned
page cannot be collapsed); a kernel without it, or a range the kernel cannot collapse
(no free 2 MiB pages), leaves the memory as it was and says so in the result.
"""

from __future__ import annotations

import ctypes
import errno
import sys
import time
from dataclasses import dataclass
from typing import Iterable

MADV_COLLAPSE = 25
CHUNK = 64 << 20  # bytes per madvise call: a failure costs one chunk, not the region


def huge_page_size() -> int:
    """The PMD huge page size (2 MiB on x86-64), from sysfs when it says."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


@dataclass
class CollapseResult:
    """What :func:`collapse` did: bytes asked (aligned interior), bytes collapsed."""

    requested: int = 0
    collapsed: int = 0
    seconds: float = 0.0
    error: str | None = None  # why some or all of it was not collapsed

    def describe(self) -> str:
        mib = 1 << 20
        s = f"{self.collapsed // mib} of {self.requested // mib} MiB on huge pages ({self.seconds:.2f} s)"
        return s + (f": {self.error}" if self.error else "")


def _aligned(addr: int, length: int, huge: int) -> tuple[int, int]:
    start = -(-addr // huge) * huge
    end = (addr + length) // huge * huge
    return start, max(0, end - start)


def collapse(ranges: Iterable[tuple[int, int]]) -> CollapseResult:
    """Collapse the 2 MiB-aligned interior of each ``(addr, length)`` range."""
    res = CollapseResult()
    if not sys.platform.startswith("linux"):
        res.error = "not Linux"
        return res
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    huge = huge_page_size()
    t0 = time.perf_counter()
    for addr, length in ranges:
        start, n = _aligned(int(addr), int(length), huge)
        res.requested += n
        for off in range(0, n, CHUNK):
            size = min(CHUNK, n - off)
            if libc.madvise(start + off, size, MADV_COLLAPSE) == 0:
                res.collapsed += size
                continue
            err = ctypes.get_errno()
            if err == errno.EINVAL:  # kernel < 6.1 or a range it will never collapse
                res.error = "MADV_COLLAPSE not supported here (EINVAL)"
                res.seconds = time.perf_counter() - t0
                return res
            res.error = f"some chunks not collapsed ({errno.errorcode.get(err, err)})"
    res.seconds = time.perf_counter() - t0
    return res


def anon_huge_bytes(addr: int, length: int) -> int:
    """AnonHugePages of the mappings that overlap ``[addr, addr + length)`` (this process)."""
    total, hit = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                hit = lo < addr + length and addr < hi
            elif hit and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total
