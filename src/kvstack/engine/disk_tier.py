"""The disk tier: one checksummed file per block, written atomically, with an LRU bounded by total file size.

File format, why checksums and atomic renames, namespaces and restart: ``docs/engine-design.md`` (section
"Storage tiers").
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
from collections.abc import Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from kvstack.engine.tier_blocks import Block, TierError, check_block, check_capacity, check_hash, cpu_copy

__all__ = ["DiskTier", "namespace_dirname"]

FILE_MAGIC = b"KVSTKVB\x00"
FILE_VERSION = 1
FILE_SUFFIX = ".kvb"
TEMP_SUFFIX = ".tmp"
_HEADER = struct.Struct("<8sHHQ32s")
_BLOCK_FILE_RE = re.compile(r"^([0-9a-f]{2,128})\.kvb$")


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
        check_capacity(capacity_bytes, "DiskTier", allow_none=True)
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
        key = check_hash(block_hash)
        check_block(tensors)
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return False
        payload = safetensors_save(cpu_copy(tensors))
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
        key = check_hash(block_hash)
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
        key = check_hash(block_hash)
        with self._lock:
            present = key in self._index
            self._delete(key)
            return present

    def contains(self, block_hash: bytes) -> bool:
        """Whether a file for the hash is indexed (its content is verified only by :meth:`get`)."""
        key = check_hash(block_hash)
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
