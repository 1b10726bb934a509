"""``mooncake.buffer_pool``: registered scratch buffers leased from a store's local buffer."""

from .store import BufferPool, RegisteredBufferPool

__all__ = ["BufferPool", "RegisteredBufferPool"]
