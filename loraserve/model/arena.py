"""Memory the CPU kernels stream every step, on transparent huge pages (CPU, Linux): the adapters' buffers
(lora/fused.py) and the GEMM's packed base weights (model/cpu_gemm.py).

Each decode step the multi-LoRA kernel streams every resident adapter's A stack and B tiles from memory:
78 MB for 8 SmolLM2 adapters of rank 16, ~19,000 pages of 4 KB, each a TLB miss and a page walk. glibc
gives each large tensor its own mmap, which is not 2 MB aligned, and where THP is `madvise` (as on this
VM) such memory never gets huge pages. An arena hands out tensors carved from large anonymous private
mappings marked `MADV_HUGEPAGE`; with the adapter buffers there, the mixed decode step's extra over a
base step went from 4.19 / 3.91 ms to 3.85 / 3.32 ms (bench/README.md, session 5's experiment). The
packed base weights (270 MB for SmolLM2) gained as much: a base decode step 2.3% faster (session 15).

Allocation is a bump pointer: nothing is freed piecemeal. A chunk's memory goes back to the system when
the last tensor cut from it is gone (each tensor holds its chunk's mapping). Callers allocate rarely: a
group cuts a member's buffers again only when a higher rank arrives (lora/fused.py), and base weights
are packed once, at start-up.
`mmap.mmap(-1, n)` alone maps MAP_SHARED memory, which follows the shmem THP setting (usually never):
the mapping must be private."""

import mmap

import torch

CHUNK_BYTES = 64 << 20      # 32 huge pages: a few models' worth of adapter buffers per chunk
ALIGN = 64                  # a cache line: the kernel's vector loads never straddle two


def hugepages_supported() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


class HugePageArena:
    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None      # uint8 view of the current mapping
        self._offset = 0
        self.mapped: list[tuple[int, int]] = []      # (address, bytes) of every mapping made so far

    def _map(self, nbytes: int) -> torch.Tensor:
        nbytes = -(-nbytes // (2 << 20)) * (2 << 20)
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(mmap.MADV_HUGEPAGE)
        chunk = torch.frombuffer(mm, dtype=torch.uint8)    # keeps `mm` mapped while any view lives
        self.mapped.append((chunk.data_ptr(), nbytes))
        return chunk

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor on huge-page-backed memory."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if nbytes > self.chunk_bytes // 4:                  # big: a mapping of its own
            return self._map(nbytes)[:nbytes].view(dtype).view(shape)
        if self._chunk is None or self._offset + nbytes > self._chunk.numel():
            self._chunk, self._offset = self._map(self.chunk_bytes), 0
        view = self._chunk[self._offset:self._offset + nbytes]
        self._offset += -(-nbytes // ALIGN) * ALIGN
        return view.view(dtype).view(shape)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether `t`'s memory lies in one of the arena's mappings."""
        return any(start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + n for start, n in self.mapped)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` in the arena."""
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out
