"""The C++ CPU kernels as test fixtures: built here, or skipped where no compiler is."""

import shutil

import pytest


def built_or_skip(module: object | None, fallback: str) -> object:
    """`module` (a kernels.* build); without one, fail if a compiler is here (the build broke), else skip
    and say which PyTorch path the engine takes instead (`fallback`)."""
    if module is None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail("a C++ compiler is here but the kernel did not build: see the logged warning")
        pytest.skip(f"no C++ compiler: {fallback}")
    return module
