"""Storage: Redis (or ``memory://``) behind one guarded front, with the Lua scripts.

- ``front.py``: :class:`Storage`, every call through the breaker, a timeout and the metrics,
  driver errors turned into :class:`StorageError`; ``breaker.py``: the circuit breaker.
- ``backends.py``: :func:`open_storage`, a storage URL to a client, one backend per scheme.
- ``scripts.py``: the Lua scripts' names and sources (``ratelimit_gw/lua/``).
- ``script_channel.py``, ``script_batch.py``: how script calls travel, batched.
- ``eviction_guard.py``: Redis must not evict (checked at start-up and periodically).
"""

from .backends import open_storage
from .front import Storage, StorageError

__all__ = ["Storage", "StorageError", "open_storage"]
