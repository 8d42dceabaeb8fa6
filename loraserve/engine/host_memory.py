"""Keep the serving process's freed heap memory instead of handing it back to the OS after every step.

glibc returns the free top of a heap to the kernel (`madvise(MADV_DONTNEED)`) once it exceeds a trim
threshold, and serves large allocations with their own `mmap`, unmapped again on free. A serving step
frees tens of MB of activations that the next step allocates again, so each step page-faulted the same
memory back in: 12,000-40,000 faults per benchmark run of the engine thread, where this VM takes ~13 us
for a first touch of a page (bench/README.md). Fixed thresholds stop both, as vLLM's preallocated
buffers do by other means: the process keeps what it used at its peak."""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3    # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20      # glibc's upper limit on 64-bit: larger blocks still get their own mmap
TRIM_THRESHOLD = 2**31 - 1      # mallopt takes an int: ~2 GiB of free top before a trim, i.e. never here


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for this process; False (and nothing done) without glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):    # not glibc (musl, macOS): leave the allocator as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.info("glibc mallopt refused the thresholds; freed memory goes back to the OS as usual")
    return ok
