"""C++ kernels for the CPU, compiled on first use with torch's cpp_extension (the sources are in csrc/).

Compiling takes ~20 s once per machine; torch caches the library under ~/.cache/torch_extensions
(or TORCH_EXTENSIONS_DIR). The library is built with -march=native, so its name carries a digest of
the source, this CPU's feature flags and the torch version: a cache shared between different machines
never loads a build made for another CPU. Without a compiler (or with `--no-cpu-kernels`) the engine
keeps its PyTorch paths and logs why."""

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -O3 and the float-reassociation flags let the compiler vectorize the dot products and sums; nothing
# here depends on infinities or NaNs, and the flags are not passed to the linker (no fast-math runtime).
# -fopenmp: at::parallel_for splits work over torch's threads only when compiled with OpenMP (without it
# the pragma is ignored and the kernel runs on one thread); the library then uses torch's own libgomp.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math"]
# The multi-LoRA kernel blocks rows that share an adapter and must give each row the same bits either
# way, so the compiler may not reorder its sums: it spells out its SIMD and only fuses a*b+c into FMAs.
CFLAGS_EXACT = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
# The lean forward's small ops reproduce PyTorch's rounding step by step: no FMA contraction at all.
CFLAGS_NO_FMA = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return next((line for line in lines if line.startswith(("flags", "Features"))), os.uname().machine)


def _digest(name: str, cflags: list[str]) -> str:
    """What a build of csrc/NAME.cpp depends on: its source, the headers it may include, this CPU, torch
    and the flags. A change to any of them gives the library a new name, so no stale build is loaded."""
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    return hashlib.sha256((CSRC / f"{name}.cpp").read_bytes() + headers + _cpu_flags().encode()
                          + torch.__version__.encode() + " ".join(cflags + ["ld"] + LDFLAGS).encode()).hexdigest()[:12]


def _build(name: str, purpose: str, cflags: list[str]) -> object | None:
    """Compile (or load the cached build of) csrc/NAME.cpp; None, logged, where it cannot be built."""
    from torch.utils import cpp_extension
    source = CSRC / f"{name}.cpp"
    digest = _digest(name, cflags)
    try:
        # Copies: cpp_extension.load appends torch's libraries to the lists it is given, which changed
        # LDFLAGS, and so the next kernel's digest, with every build made earlier in the process.
        return cpp_extension.load(f"loraserve_{name}_{digest}", [str(source)], extra_cflags=list(cflags),
                                  extra_ldflags=list(LDFLAGS))
    except Exception as e:    # no compiler, no ninja, headers missing: the PyTorch path still works
        log.warning("CPU %s kernel not built (%s: %s); %s uses the PyTorch path", name, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "", purpose)
        return None


@functools.cache
def paged_attention() -> object | None:
    """The compiled module with `paged_decode_attention`, or None (logged) where it cannot be built."""
    return _build("paged_attention", "decode attention", CFLAGS)


@functools.cache
def multi_lora() -> object | None:
    """The compiled module with `multi_lora_apply`, or None (logged) where it cannot be built."""
    return _build("multi_lora", "multi-LoRA", CFLAGS_EXACT)


@functools.cache
def gemm() -> object | None:
    """The compiled bf16 GEMM (`pack`, `linear`) where this CPU has AVX512-BF16 or AVX2 with FMA (its
    `path` says which), else None (oneDNN then)."""
    module = _build("gemm", "bf16 linear layers", CFLAGS_EXACT)
    if module is not None and not module.path:
        log.info("this CPU has neither AVX512-BF16 nor AVX2 with FMA: bf16 linear layers use oneDNN")
        return None
    return module


@functools.cache
def layer_ops() -> object | None:
    """The compiled small ops of model/decoder.py (RMSNorm, RoPE, SiLU, argmax), or None (logged)."""
    return _build("layer_ops", "the lean forward's small ops (and the greedy argmax)", CFLAGS_NO_FMA)


def share_helper_thread(modules: list[object | None]) -> None:
    """Make the built kernel extensions among `modules` run their shared loops on one helper thread, the
    first one's (csrc/helper_thread.h: each extension compiles its own, and two helpers polling for the
    one core the engine leaves took turns on it)."""
    built = [m for m in modules if m is not None]
    if len(built) > 1:
        capsule = built[0].helper_capsule()
        for module in built[1:]:
            module.use_helper(capsule)

