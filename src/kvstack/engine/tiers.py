"""Hierarchical storage tiers for evicted prefix-cache KV blocks: host memory first, then local disk.

The device pool (:class:`~kvstack.engine.blocks.BlockPool`) holds only as many KV blocks as fit in
accelerator memory. When a *cached* block (a full block registered under its hash) is evicted there, its
KV content need not be lost: it is written down to a cheaper, larger tier and loaded back on a later
prefix-cache hit, which costs a copy instead of recomputing the prefill of those tokens.

Design
------
* A **block** is the KV content of one full block of tokens: a dict of tensors (e.g. ``{"keys": ...,
  "values": ...}``) keyed by its block hash (:func:`~kvstack.engine.blocks.block_hash`). A hash names its
  whole prefix and therefore its content: storing a hash that is already present is a no-op that only
  refreshes its recency.
* :class:`HostTier` is an in-memory LRU of CPU copies, bounded by ``capacity_bytes`` (the sum of the
  tensors' ``nbytes``). The engine writes a block there when the device pool evicts it. When the host tier
  is full, its least recently used block is written to the next tier (**written on eviction**, so a block
  costs disk I/O only once it has really aged out of memory) and dropped from memory.
* :class:`DiskTier` stores one file per block, bounded (optionally) by ``capacity_bytes`` of file sizes
  with its own LRU order. It is inclusive: a block read back from disk keeps its file, so a later eviction
  from host does not write it again, and the file survives a restart.
* :class:`TieredStore` is the engine's entry point: ``put`` goes to host (spilling as above), ``get`` looks
  in host, then on disk; a disk hit is promoted to host. ``prefetch`` starts reading disk-resident blocks
  on one background thread as soon as the scheduler knows a request will hit them, so the file reads and
  checksum verification overlap with the forward pass of the current step; the later ``get`` only waits
  for what is left of the read.

File format
-----------
``<directory>/<namespace dir>/<hex hash>.kvb``, little-endian::

    magic       8 bytes   b"KVSTKVB\\x00"
    version     uint16    1
    hash_len    uint16    length of the block hash (1..64)
    payload_len uint64    length of the payload in bytes
    checksum    32 bytes  sha256 of the payload
    block hash  hash_len bytes
    payload     payload_len bytes: the tensors serialised by ``safetensors.torch.save``

Why checksums and atomic renames
--------------------------------
Serving wrong KV is silent and much worse than recomputing it: the model would attend to another
prompt's keys and produce plausible but wrong text. So a file is only ever served when its magic, version,
length, payload checksum and the block hash recorded inside it (not just its file name) all match and the
payload deserialises. Anything else (a torn write, a flipped bit, a truncated file, a file copied or
renamed under another hash, a file from an unknown format version) is deleted, counted as ``corrupt`` and
reported as a miss, so the caller recomputes the block. Writes go to a temporary file in the same
directory, are fsynced, and are then moved into place with ``os.replace``, which is atomic on POSIX: a
reader sees either no file or a complete one, and a crash leaves at worst a stray temporary file, which
the next start-up removes.

Namespace
---------
The same token prefix yields different KV under different models, dtypes or quantisation settings, so
every :class:`DiskTier` has a namespace (e.g. ``"SmolLM2-135M/bfloat16"``) and keeps its files in a
subdirectory of its own, named from the namespace made filesystem-safe plus 16 hex digits of its sha256
(so two namespaces that sanitise to the same text still differ). Two models sharing a directory never see
each other's blocks. Block hashes computed with :func:`block_hash` and the model as namespace are already
distinct per model; the directory namespace also protects against callers that hash without one.

Restart
-------
A new :class:`DiskTier` on the same directory and namespace rebuilds its index from the directory
listing: every ``<hex>.kvb`` file is indexed (contents are verified lazily, on ``get``), its LRU order is
initialised from file modification times (a hit touches the file's mtime, so recency survives restarts),
stray ``*.tmp`` files from an interrupted write are removed, and files beyond ``capacity_bytes`` are
evicted oldest first.

Limitations
-----------
* One process per namespace directory: the index is per process, and start-up deletes temporary files,
  including another live process's in-flight write.
* ``put`` of a hash whose file exists does not verify that file; if it is corrupt, the block is detected
  and lost on the next ``get`` (a miss, never wrong data).
* Write errors (e.g. a full disk) are counted in ``metrics()["write_errors"]`` and the block is dropped
  instead of raising: this is a cache.
* :class:`TieredStore` expects one caller thread; only the :class:`DiskTier` is shared with the prefetch
  thread and is guarded by a lock (so a prefetch read and a spill to disk serialise on it).
* Prefetched blocks that are never fetched stay in memory until ``get``, ``close`` or
  :meth:`TieredStore.cancel_prefetch`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from kvstack.errors import KVStackError

__all__ = [
    "DiskTier",
    "HostTier",
    "TierError",
    "TieredStore",
]

FILE_MAGIC = b"KVSTKVB\x00"
FILE_VERSION = 1
FILE_SUFFIX = ".kvb"
TEMP_SUFFIX = ".tmp"
MAX_HASH_BYTES = 64
_HEADER = struct.Struct("<8sHHQ32s")
_BLOCK_FILE_RE = re.compile(r"^([0-9a-f]{2,128})\.kvb$")

Block = dict[str, torch.Tensor]


class TierError(KVStackError):
    """A storage tier was configured or called with invalid arguments."""


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _check_capacity(capacity_bytes: int | None, what: str, allow_none: bool) -> None:
    """Raise :class:`TierError` unless ``capacity_bytes`` is a non-negative int (or None when allowed)."""
    if capacity_bytes is None and allow_none:
        return
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
        hint = "a non-negative int of bytes" + (" or None for unbounded" if allow_none else "")
        raise TierError(f"{what} capacity_bytes must be {hint}, got {capacity_bytes!r}")


def _check_hash(block_hash: bytes) -> bytes:
    """Return ``block_hash`` as bytes, or raise :class:`TierError` if it is not 1..64 bytes."""
    if not isinstance(block_hash, (bytes, bytearray, memoryview)):
        raise TierError(f"a block hash must be bytes (e.g. from block_hash()), got {type(block_hash).__name__}")
    value = bytes(block_hash)
    if not 1 <= len(value) <= MAX_HASH_BYTES:
        raise TierError(f"a block hash must be 1 to {MAX_HASH_BYTES} bytes long, got {len(value)} bytes")
    return value


def _check_block(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`TierError` unless ``tensors`` is a non-empty mapping of str to tensors."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise TierError("a block must be a non-empty dict of name -> torch.Tensor, e.g. {'keys': k, 'values': v}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TierError(
                f"a block must map str names to torch.Tensor, got {type(name).__name__} -> {type(tensor).__name__}"
            )


def _block_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Total ``nbytes`` of the tensors of a block."""
    return sum(int(tensor.nbytes) for tensor in tensors.values())


def _cpu_copy(tensors: Mapping[str, torch.Tensor]) -> Block:
    """Detached, contiguous CPU copies of a block's tensors (never aliasing the caller's memory)."""
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}


def namespace_dirname(namespace: str) -> str:
    """The filesystem-safe directory name of a namespace: sanitised text plus 16 hex digits of its sha256.

    Parameters
    ----------
    namespace : str
        Non-empty key space, e.g. a model name plus dtype.

    Returns
    -------
    str
        A name made of ``[A-Za-z0-9._-]`` only, distinct for distinct namespaces.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", namespace)[:80].lstrip(".") or "ns"
    digest = hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:16]
    return f"{safe}-{digest}"


# --------------------------------------------------------------------------------------------------
# Disk tier
# --------------------------------------------------------------------------------------------------


class DiskTier:
    """Blocks stored as checksummed files, one per hash, with optional LRU eviction by total file size.

    Parameters
    ----------
    directory : str or os.PathLike
        Root directory; created if needed. Files live in ``directory/<namespace dir>/<hex hash>.kvb``.
    namespace : str
        Non-empty key space, e.g. ``"SmolLM2-135M/bfloat16"``; different namespaces never share blocks.
    capacity_bytes : int or None, optional
        Maximum total size of the block files; least recently used files are deleted to stay under it.
        None (default) means unbounded.
    durable : bool, optional
        fsync each file and the directory before and after the rename (default True). False trades crash
        durability for speed; the checksum still catches a torn file.

    Raises
    ------
    TierError
        If the namespace is empty, the capacity negative, or the directory cannot be created or written.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        namespace: str,
        capacity_bytes: int | None = None,
        durable: bool = True,
    ) -> None:
        if not isinstance(namespace, str) or not namespace.strip():
            raise TierError(f"DiskTier needs a non-empty namespace such as '<model>/<dtype>', got {namespace!r}")
        _check_capacity(capacity_bytes, "DiskTier", allow_none=True)
        self.namespace = namespace
        self.capacity_bytes = capacity_bytes
        self.durable = bool(durable)
        self.root = os.fspath(directory)
        self.path = os.path.join(self.root, namespace_dirname(namespace))
        try:
            os.makedirs(self.path, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", suffix=TEMP_SUFFIX, dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            reason = (exc.strerror or type(exc).__name__).lower()
            raise TierError(
                f"DiskTier directory {self.path!r} is not a writable directory ({reason}); "
                "pass a directory you can write to"
            ) from exc
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, oldest first
        self._bytes = 0
        self._counts = dict.fromkeys(
            ("hits", "misses", "writes", "evictions", "corrupt", "rejected", "write_errors", "stale_temp"), 0
        )
        self._rebuild_index()

    # ------------------------------------------------------------------ start-up

    def _rebuild_index(self) -> None:
        """Index the block files on disk (oldest mtime first), remove stray temp files, enforce capacity."""
        found: list[tuple[int, str, bytes, int]] = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(TEMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        self._counts["stale_temp"] += 1
                    continue
                match = _BLOCK_FILE_RE.match(entry.name)
                if match is None or len(match.group(1)) % 2:
                    continue
                try:
                    stat = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                found.append((stat.st_mtime_ns, entry.name, bytes.fromhex(match.group(1)), stat.st_size))
        for _mtime, _name, block_hash, size in sorted(found):
            self._index[block_hash] = size
            self._bytes += size
        self._evict_to(self.capacity_bytes)

    # ------------------------------------------------------------------ internals (lock held)

    def _file(self, block_hash: bytes) -> str:
        return os.path.join(self.path, block_hash.hex() + FILE_SUFFIX)

    def _forget(self, block_hash: bytes) -> None:
        size = self._index.pop(block_hash, None)
        if size is not None:
            self._bytes -= size

    def _delete(self, block_hash: bytes) -> None:
        self._forget(block_hash)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(block_hash))

    def _evict_to(self, limit: int | None) -> None:
        if limit is None:
            return
        while self._index and self._bytes > limit:
            oldest = next(iter(self._index))
            self._delete(oldest)
            self._counts["evictions"] += 1

    def _fsync_dir(self) -> None:
        if not self.durable:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _decode(self, block_hash: bytes, data: bytes) -> Block | None:
        """The tensors of a file's bytes, or None if any check fails."""
        if len(data) < _HEADER.size:
            return None
        magic, version, hash_len, payload_len, checksum = _HEADER.unpack_from(data)
        if magic != FILE_MAGIC or version != FILE_VERSION or hash_len != len(block_hash):
            return None
        start = _HEADER.size + hash_len
        if data[_HEADER.size : start] != block_hash or len(data) - start != payload_len:
            return None
        payload = data[start:]
        if hashlib.sha256(payload).digest() != checksum:
            return None
        try:
            tensors = safetensors_load(payload)
        except Exception:  # any deserialisation failure means the file cannot be trusted
            return None
        return tensors if tensors else None

    # ------------------------------------------------------------------ public API

    def put(self, block_hash: bytes, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Store a block unless its hash is already present (then only its recency is refreshed).

        Parameters
        ----------
        block_hash : bytes
            The block's hash (1..64 bytes).
        tensors : mapping of str to torch.Tensor
            The block's KV content; copied to CPU for serialisation, the caller's tensors are not kept.

        Returns
        -------
        bool
            True if a file was written; False if the hash was present, the block alone exceeds the
            capacity (counted as ``rejected``), or the write failed (counted as ``write_errors``).

        Raises
        ------
        TierError
            If the hash or the block is malformed.
        """
        key = _check_hash(block_hash)
        _check_block(tensors)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return False
        payload = safetensors_save(_cpu_copy(tensors))
        header = _HEADER.pack(FILE_MAGIC, FILE_VERSION, len(key), len(payload), hashlib.sha256(payload).digest())
        size = len(header) + len(key) + len(payload)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return False
            if self.capacity_bytes is not None and size > self.capacity_bytes:
                self._counts["rejected"] += 1
                return False
            temp_path = None
            try:
                fd, temp_path = tempfile.mkstemp(prefix=f".{key.hex()[:16]}-", suffix=TEMP_SUFFIX, dir=self.path)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(header)
                    handle.write(key)
                    handle.write(payload)
                    handle.flush()
                    if self.durable:
                        os.fsync(handle.fileno())
                os.replace(temp_path, self._file(key))
                temp_path = None
            except OSError:
                self._counts["write_errors"] += 1
                return False
            finally:
                if temp_path is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(temp_path)
            self._fsync_dir()
            self._index[key] = size
            self._bytes += size
            self._counts["writes"] += 1
            self._evict_to(self.capacity_bytes)
            return True

    def get(self, block_hash: bytes) -> Block | None:
        """Load a block, verifying it; a missing or corrupt file is a miss (a corrupt one is deleted).

        Parameters
        ----------
        block_hash : bytes
            The block's hash.

        Returns
        -------
        dict of str to torch.Tensor or None
            The stored tensors (fresh CPU tensors), or None on a miss.
        """
        key = _check_hash(block_hash)
        with self._lock:
            if key not in self._index:
                self._counts["misses"] += 1
                return None
            path = self._file(key)
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:  # removed behind our back: forget it
                self._forget(key)
                self._counts["misses"] += 1
                return None
            except OSError:  # unreadable right now (e.g. permissions, I/O error): a miss, keep the entry
                self._counts["misses"] += 1
                return None
            tensors = self._decode(key, data)
            if tensors is None:
                self._delete(key)
                self._counts["corrupt"] += 1
                self._counts["misses"] += 1
                return None
            self._index.move_to_end(key)
            self._counts["hits"] += 1
            with contextlib.suppress(OSError):
                os.utime(path)  # recency survives a restart
            return tensors

    def delete(self, block_hash: bytes) -> bool:
        """Remove a block's file if present; return whether it was indexed."""
        key = _check_hash(block_hash)
        with self._lock:
            present = key in self._index
            self._delete(key)
            return present

    def contains(self, block_hash: bytes) -> bool:
        """Whether a file for the hash is indexed (its content is verified only by :meth:`get`)."""
        key = _check_hash(block_hash)
        with self._lock:
            return key in self._index

    def __contains__(self, block_hash: object) -> bool:
        return isinstance(block_hash, (bytes, bytearray)) and self.contains(bytes(block_hash))

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def nbytes(self) -> int:
        """Total size in bytes of the indexed block files (headers included)."""
        with self._lock:
            return self._bytes

    def metrics(self) -> dict[str, int]:
        """Counters: hits, misses, writes, evictions, corrupt, rejected, write_errors, stale_temp, plus
        the current ``bytes`` and ``blocks``."""
        with self._lock:
            return {**self._counts, "bytes": self._bytes, "blocks": len(self._index)}

    def __repr__(self) -> str:
        return (
            f"DiskTier(path={self.path!r}, blocks={len(self)}, bytes={self.nbytes()}, "
            f"capacity_bytes={self.capacity_bytes})"
        )


# --------------------------------------------------------------------------------------------------
# Host tier
# --------------------------------------------------------------------------------------------------


class HostTier:
    """An in-memory LRU of CPU copies of blocks; the least recently used block spills to ``next_tier``.

    Parameters
    ----------
    capacity_bytes : int
        Maximum total ``nbytes`` of the tensors held (0 holds nothing: every block passes straight down).
    next_tier : DiskTier or None, optional
        Where evicted blocks are written; None drops them.

    Raises
    ------
    TierError
        If ``capacity_bytes`` is not a non-negative int or ``next_tier`` is not a DiskTier.
    """

    def __init__(self, capacity_bytes: int, next_tier: DiskTier | None = None) -> None:
        _check_capacity(capacity_bytes, "HostTier", allow_none=False)
        if next_tier is not None and not isinstance(next_tier, DiskTier):
            raise TierError(f"HostTier next_tier must be a DiskTier or None, got {type(next_tier).__name__}")
        self.capacity_bytes = capacity_bytes
        self.next_tier = next_tier
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._sizes: dict[bytes, int] = {}
        self._bytes = 0
        self._counts = dict.fromkeys(("hits", "misses", "puts", "evictions", "spills", "dropped"), 0)

    def _evict_one(self) -> None:
        key, tensors = self._blocks.popitem(last=False)
        self._bytes -= self._sizes.pop(key)
        self._counts["evictions"] += 1
        self._pass_down(key, tensors)

    def _pass_down(self, key: bytes, tensors: Block) -> None:
        if self.next_tier is None:
            self._counts["dropped"] += 1
            return
        self.next_tier.put(key, tensors)
        self._counts["spills"] += 1

    def _insert(self, key: bytes, tensors: Block) -> None:
        """Insert tensors the tier may own (already CPU copies), evicting the LRU blocks to make room."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        size = _block_nbytes(tensors)
        self._counts["puts"] += 1
        if size > self.capacity_bytes:  # would never fit: goes straight to the next tier
            self._pass_down(key, tensors)
            return
        while self._blocks and self._bytes + size > self.capacity_bytes:
            self._evict_one()
        self._blocks[key] = tensors
        self._sizes[key] = size
        self._bytes += size

    def put(self, block_hash: bytes, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store a CPU copy of a block as the most recent; a present hash only refreshes its recency.

        Parameters
        ----------
        block_hash : bytes
            The block's hash.
        tensors : mapping of str to torch.Tensor
            The block's KV content (any device); copied, so the caller may reuse its memory.
        """
        key = _check_hash(block_hash)
        _check_block(tensors)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        self._insert(key, _cpu_copy(tensors))

    def get(self, block_hash: bytes) -> Block | None:
        """The block's tensors (shared with the tier: do not modify them in place), or None; a hit becomes
        the most recent."""
        key = _check_hash(block_hash)
        tensors = self._blocks.get(key)
        if tensors is None:
            self._counts["misses"] += 1
            return None
        self._blocks.move_to_end(key)
        self._counts["hits"] += 1
        return dict(tensors)

    def flush(self) -> int:
        """Write every held block to the next tier (keeping it in memory); return how many were written.

        Used at shutdown so that a restart finds the whole prefix cache on disk. Without a next tier, nothing.
        """
        if self.next_tier is None:
            return 0
        for key, tensors in self._blocks.items():
            self.next_tier.put(key, tensors)
        return len(self._blocks)

    def pop(self, block_hash: bytes) -> Block | None:
        """Remove a block without writing it to the next tier; return its tensors or None."""
        key = _check_hash(block_hash)
        tensors = self._blocks.pop(key, None)
        if tensors is not None:
            self._bytes -= self._sizes.pop(key)
        return tensors

    def contains(self, block_hash: bytes) -> bool:
        """Whether the block is held in memory (does not change recency)."""
        return _check_hash(block_hash) in self._blocks

    def __contains__(self, block_hash: object) -> bool:
        return isinstance(block_hash, (bytes, bytearray)) and bytes(block_hash) in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self) -> list[bytes]:
        """The held hashes, least recently used first."""
        return list(self._blocks)

    def nbytes(self) -> int:
        """Sum of ``nbytes`` of the tensors held."""
        return self._bytes

    def metrics(self) -> dict[str, int]:
        """Counters: hits, misses, puts, evictions, spills (written to the next tier), dropped (no next
        tier), plus the current ``bytes`` and ``blocks``."""
        return {**self._counts, "bytes": self._bytes, "blocks": len(self._blocks)}

    def __repr__(self) -> str:
        return f"HostTier(blocks={len(self)}, bytes={self._bytes}, capacity_bytes={self.capacity_bytes})"


# --------------------------------------------------------------------------------------------------
# Tiered store
# --------------------------------------------------------------------------------------------------


class TieredStore:
    """Host tier over an optional disk tier, with background prefetch from disk.

    Parameters
    ----------
    host : HostTier
        The memory tier; its ``next_tier`` must be ``disk`` (both None is allowed).
    disk : DiskTier or None
        The disk tier, or None for memory only.

    Raises
    ------
    TierError
        If ``host.next_tier`` is not ``disk``.
    """

    def __init__(self, host: HostTier, disk: DiskTier | None) -> None:
        if not isinstance(host, HostTier):
            raise TierError(f"TieredStore host must be a HostTier, got {type(host).__name__}")
        if host.next_tier is not disk:
            raise TierError(
                "TieredStore needs host.next_tier to be the disk tier it is given; "
                "build HostTier(capacity, next_tier=disk)"
            )
        self.host = host
        self.disk = disk
        self._executor: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstack-prefetch") if disk is not None else None
        )
        self._pending: dict[bytes, Future[Block | None]] = {}
        self._closed = False
        self._counts = dict.fromkeys(("host_hits", "disk_hits", "misses", "prefetched", "prefetch_hits"), 0)

    def put(self, block_hash: bytes, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store a block in the host tier (copied to CPU); older blocks spill to disk as needed."""
        self.host.put(block_hash, tensors)

    def get(self, block_hash: bytes) -> Block | None:
        """The block from host, else from disk (waiting for its prefetch if one is running), else None.

        A disk hit is promoted to the host tier as the most recent block.
        """
        key = _check_hash(block_hash)
        future = self._pending.pop(key, None)
        tensors = self.host.get(key)
        if tensors is not None:
            if future is not None:
                future.cancel()
            self._counts["host_hits"] += 1
            return tensors
        if self.disk is None:
            self._counts["misses"] += 1
            return None
        if future is not None and not future.cancelled():
            tensors = future.result()
            if tensors is not None:
                self._counts["prefetch_hits"] += 1
        else:
            tensors = self.disk.get(key)
        if tensors is None:
            self._counts["misses"] += 1
            return None
        self._counts["disk_hits"] += 1
        self.host._insert(key, tensors)  # fresh CPU tensors from the file: no copy needed
        return dict(tensors)

    def prefetch(self, block_hashes: Iterable[bytes]) -> int:
        """Start reading disk-resident blocks on the background thread; return how many were scheduled.

        Hashes already in host memory, already being prefetched, or not on disk are skipped.

        Raises
        ------
        TierError
            If the store is closed.
        """
        if self._closed:
            raise TierError("TieredStore is closed; create a new one to prefetch")
        if self._executor is None or self.disk is None:
            return 0
        scheduled = 0
        for block_hash in block_hashes:
            key = _check_hash(block_hash)
            if key in self._pending or self.host.contains(key) or not self.disk.contains(key):
                continue
            self._pending[key] = self._executor.submit(self.disk.get, key)
            scheduled += 1
        self._counts["prefetched"] += scheduled
        return scheduled

    def cancel_prefetch(self) -> None:
        """Forget every pending prefetch (those already running finish in the background)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def contains(self, block_hash: bytes) -> bool:
        """Whether the block is in host memory or indexed on disk."""
        return self.host.contains(block_hash) or (self.disk is not None and self.disk.contains(block_hash))

    def metrics(self) -> dict[str, int]:
        """Counters: host_hits, disk_hits, misses, prefetched, prefetch_hits, spills (host -> disk),
        corrupt (disk files detected and deleted), host_bytes, disk_bytes."""
        disk = self.disk.metrics() if self.disk is not None else {"corrupt": 0, "bytes": 0}
        host = self.host.metrics()
        return {
            **self._counts,
            "spills": host["spills"],
            "corrupt": disk["corrupt"],
            "host_bytes": host["bytes"],
            "disk_bytes": disk["bytes"],
        }

    def flush(self) -> int:
        """Write every host-resident block to the disk tier (see :meth:`HostTier.flush`); return the count."""
        return self.host.flush()

    def close(self) -> None:
        """Cancel pending prefetches and shut the background thread down; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self.cancel_prefetch()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
