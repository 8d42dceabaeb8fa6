"""The serving process keeps freed heap memory (engine/host_memory.py): a freed block stays resident
instead of going back to the OS, to be faulted in again by the next step."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from loraserve.engine.host_memory import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = resident_mb()
p = libc.malloc(24 << 20)
ctypes.memset(p, 1, 24 << 20)            # touch every page
libc.free(p)
print(resident_mb() - before)
"""


def freed_but_resident_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_stays_with_the_process():
    assert freed_but_resident_mb("default") < 4       # glibc's default: a 24 MB block is unmapped on free
    assert freed_but_resident_mb("keep") > 20         # kept: the next step reuses it without page faults
