"""Scratch buffers that one caller reuses from call to call (CPU).

glibc hands every block of more than 32 MiB straight back to the operating system when it is
freed, so a fresh buffer of that size is zero-filled page by page on first touch: about 0.4 ms per
MiB on the 2-core test machine, ~35 ms for one 12-head x 14k-token x 128 fp32 copy of q, more than
the copy itself. A caller that runs the same attention shape again and again (the attention
processors of a model, layer after layer within a forward call) keeps a :class:`Workspace` and passes it to
:func:`~fastgen.attention.rectified_sparse_attention`; the reordered q/k/v copies then land in
buffers that are already mapped. CUDA has PyTorch's caching allocator, so there the workspace
hands out fresh tensors and keeps nothing.

Only internal temporaries live in a workspace; nothing a function returns does. One call at a
time per workspace.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Workspace"]


class Workspace:
    """Named scratch tensors kept between calls; a request with another size replaces the buffer.

    Example:
        >>> ws = Workspace()
        >>> a = ws.empty("q", (4, 8), torch.float32, torch.device("cpu"))
        >>> b = ws.empty("q", (4, 8), torch.float32, torch.device("cpu"))  # the same memory
        >>> a.data_ptr() == b.data_ptr()
        True
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def empty(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised contiguous tensor; on the CPU the buffer kept under ``name`` (any
        contents) when it has the same number of elements, dtype and device."""
        device = torch.device(device)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)  # free the old one before allocating its successor
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf.view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (the memory goes back to the allocator)."""
        self._buffers.clear()

    def __repr__(self) -> str:
        return f"Workspace({len(self._buffers)} buffers, {self.nbytes / 2**20:.1f} MiB)"
