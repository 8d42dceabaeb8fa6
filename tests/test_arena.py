"""The huge-page arena (model/arena.py) that holds the multi-LoRA kernel's adapter buffers and the packed
base weights: copies are exact, aligned and carved from private mappings advised for huge pages; big
tensors get a mapping of their own; an engine using the kernel keeps every A stack and B tile there, with
the same outputs."""

import pytest
import torch

from loraserve.model.arena import ALIGN, HugePageArena, hugepages_supported

pytestmark = pytest.mark.skipif(not hugepages_supported(), reason="no MADV_HUGEPAGE here")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` in /proc/self/smaps ('hg': advised for huge pages)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_copies_are_exact_aligned_and_advised_for_huge_pages():
    arena = HugePageArena(chunk_bytes=4 << 20)
    sources = [torch.randn(3, 5, 7).to(torch.bfloat16), torch.randn(100), torch.arange(9, dtype=torch.int64)]
    copies = [arena.copy(t) for t in sources]
    for src, out in zip(sources, copies):
        assert torch.equal(out, src) and out.is_contiguous() and out.dtype == src.dtype
        assert out.data_ptr() % ALIGN == 0 and arena.holds(out)
    assert len(arena.mapped) == 1                       # small tensors share one chunk
    assert "hg" in vm_flags(copies[0].data_ptr())
    assert "hg" not in vm_flags(torch.empty(1 << 20).data_ptr())   # ordinary memory is not advised
    assert not arena.holds(sources[0])


def test_big_tensors_get_their_own_mapping_and_chunks_fill_up():
    arena = HugePageArena(chunk_bytes=4 << 20)
    big = arena.empty((3 << 20,), torch.uint8)          # over a quarter of a chunk
    assert arena.mapped[0][1] == 4 << 20 and arena.holds(big)       # rounded up to whole huge pages
    a = arena.empty((800_000,), torch.uint8)
    b = arena.empty((800_000,), torch.uint8)
    assert len(arena.mapped) == 2 and b.data_ptr() - a.data_ptr() == -(-800_000 // ALIGN) * ALIGN
    for _ in range(4):                                  # 6 of these do not fit one 4 MB chunk
        arena.empty((800_000,), torch.uint8)
    assert len(arena.mapped) == 3
    assert arena.empty((0, 4), torch.float32).shape == (0, 4)


def test_memory_outlives_the_arena_while_a_tensor_uses_it():
    arena = HugePageArena(chunk_bytes=4 << 20)
    t = arena.copy(torch.arange(1000, dtype=torch.float32))
    del arena
    t.add_(1)
    assert t[999] == 1000
