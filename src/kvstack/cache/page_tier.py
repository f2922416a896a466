"""A layer that keeps every entry, in pages in a slower tier, and reads only some pages per decoding step.

For page-reading policies (Quest). Per layer:

* resident: each full page's element-wise key minimum and maximum (``[B, H, P, D]`` each), each page block's
  checksum (``[P, B, H]`` uint64), the true positions of every entry (``[B, N]`` int32, padding ``-1``), and
  the newest entries that do not fill a page yet (``[B, H, t, D]``, ``t < page``);
* in the tier (:class:`PageFile`): every full page, one block of ``[2, page, D]`` (keys then values) per
  ``(page, sequence, head)``, in a memory-mapped file.

A decoding step (one new token) asks the policy for each page's score bound, reads the top pages (checked
against their checksums) and attends exactly over them and the resident entries; a prompt chunk reads every
page (exact attention). Full pages leave the resident set after the forward that filled them.
``kv_bytes()`` counts the resident tensors; ``tier_bytes()`` the file.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from kvstack.cache.attention_stats import attention_with_stats
from kvstack.cache.layer import WeakOwner, chunk_masks
from kvstack.cache.pending import set_pending
from kvstack.errors import KVStackError

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache

__all__ = ["PageFile", "TierError", "TieredLayer", "check_tier_dir"]

_MULTIPLIERS: dict[int, np.ndarray] = {}


class TierError(KVStackError):
    """The slow tier cannot be used (unwritable directory) or holds a page that fails its checksum."""


def check_tier_dir(directory: str | None) -> str:
    """The tier directory to use (the system's temporary one for None); one line if it is not writable."""
    path = directory if directory is not None else tempfile.gettempdir()
    if not os.path.isdir(path):
        raise TierError(f"tier_dir {path!r} is not a directory; give a writable directory for the slow tier")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kvstack-probe-", dir=path)
    except OSError as err:
        raise TierError(f"tier_dir {path!r} is not writable ({err.strerror}); give a writable directory") from None
    os.close(fd)
    os.unlink(probe)
    return path


def block_checksums(blocks: np.ndarray) -> np.ndarray:
    """``[n]`` uint64 checksums of ``[n, words]`` uint32 blocks: a position-weighted sum (wrapping), so a
    changed, swapped or zeroed word changes it."""
    words = blocks.shape[1]
    multipliers = _MULTIPLIERS.get(words)
    if multipliers is None:
        multipliers = (np.arange(words, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(1)) | np.uint64(1)
        _MULTIPLIERS[words] = multipliers
    with np.errstate(over="ignore"):
        return (blocks.astype(np.uint64) * multipliers).sum(axis=1, dtype=np.uint64)


class PageFile:
    """Full pages in a memory-mapped file: block ``(page, sequence, head)`` is ``[2, page, D]`` (keys, values).

    The file is removed when the object is collected.
    """

    def __init__(self, directory: str, batch: int, heads: int, page: int, head_dim: int, dtype: torch.dtype) -> None:
        self.batch, self.heads, self.page, self.head_dim, self.dtype = batch, heads, page, head_dim, dtype
        self.element = torch.empty((), dtype=dtype).element_size()
        if self.element not in (2, 4):
            raise TierError(f"the slow tier holds 16- or 32-bit entries, not {dtype}")
        self.block_bytes = 2 * page * head_dim * self.element
        if self.block_bytes % 4:
            raise TierError(f"a page block of {self.block_bytes} bytes does not hold whole 32-bit words")
        fd, self.path = tempfile.mkstemp(prefix="kvstack-tier-", suffix=".pages", dir=directory)
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, self.path)
        self.pages = 0
        self.checksums = np.empty((0, batch, heads), dtype=np.uint64)
        self._mmap: mmap.mmap | None = None
        self._map: np.ndarray | None = None  # [records, block bytes] view of the mapping

    def nbytes(self) -> int:
        """Bytes the file holds."""
        return self.pages * self.batch * self.heads * self.block_bytes

    def checksum_nbytes(self) -> int:
        return self.checksums.nbytes

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write full pages: ``keys``, ``values`` ``[B, H, n * page, D]``."""
        count = keys.shape[2] // self.page
        blocks = torch.stack((keys, values), dim=2)  # [B, H, 2, n * page, D]
        blocks = blocks.view(self.batch, self.heads, 2, count, self.page, self.head_dim)
        blocks = blocks.permute(3, 0, 1, 2, 4, 5).contiguous().cpu()  # [n, B, H, 2, page, D]
        raw = blocks.view(torch.uint8).numpy().reshape(count * self.batch * self.heads, -1)
        sums = block_checksums(raw.view(np.uint32)).reshape(count, self.batch, self.heads)
        with open(self.path, "ab") as handle:
            handle.write(raw.tobytes())
        self.pages += count
        self.checksums = np.concatenate((self.checksums, sums))
        self._unmap()

    def read(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, k * page, D]`` of the pages ``[B, H, k]`` each (sequence, head) reads,
        each block checked against its checksum first."""
        batch, heads, count = pages.shape
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._mmap = mmap.mmap(handle.fileno(), self.nbytes(), access=mmap.ACCESS_READ)
            self._map = np.frombuffer(self._mmap, dtype=np.uint8).reshape(self.pages * batch * heads, -1)
        sequence = torch.arange(batch).view(batch, 1, 1)
        head = torch.arange(heads).view(1, heads, 1)
        records = ((pages.cpu() * batch + sequence) * heads + head).reshape(-1).numpy()
        raw = self._map[records]  # a copy: [B * H * k, block bytes]
        # The pages read stay in the OS's file cache, not in this process: drop them from the mapping, so the
        # resident set holds only what the cache keeps resident.
        self._mmap.madvise(mmap.MADV_DONTNEED)
        expected = self.checksums.reshape(-1)[records]
        bad = np.nonzero(block_checksums(raw.view(np.uint32)) != expected)[0]
        if bad.size:
            page = int(records[bad[0]]) // (batch * heads)
            raise TierError(f"page {page} of the slow tier {self.path} fails its checksum; it is refused, not read")
        # Split keys from values in numpy: a small strided copy costs torch far more (its thread pool).
        elements = raw.view(np.uint16 if self.element == 2 else np.uint32)
        blocks = elements.reshape(batch, heads, count, 2, self.page * self.head_dim)
        shape = (batch, heads, count * self.page, self.head_dim)
        keys = torch.from_numpy(np.ascontiguousarray(blocks[:, :, :, 0]).reshape(shape)).view(self.dtype)
        values = torch.from_numpy(np.ascontiguousarray(blocks[:, :, :, 1]).reshape(shape)).view(self.dtype)
        return keys, values

    def _unmap(self) -> None:
        self._map = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def close(self) -> None:
        self._unmap()
        self._finalizer()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class TieredLayer(CacheLayerMixin):
    """One layer of a page-reading policy's cache (see the module docstring)."""

    owner: WeakOwner[KVStackCache] = WeakOwner()
    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: KVStackCache, layer_idx: int, tier_dir: str) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.tier_dir = tier_dir
        self.seen = 0
        self.pending = False
        self.has_padding = False
        self.pages: PageFile | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, _, self.head_dim = key_states.shape
        self.page = self.owner.method.page_size()
        self.pages = PageFile(self.tier_dir, self.batch, self.heads, self.page, self.head_dim, self.dtype)
        self.tail_keys = key_states.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.tail_values = value_states.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.page_min = key_states.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.page_max = key_states.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.positions = torch.empty((self.batch, 0), dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        """Hold the new chunk ``[B, H, q, D]`` with the newest entries until its attention (next)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError("kvstack cache used without the kvstack attention function; create caches with "
                               "kvstack.make_cache(model, spec), which selects it")
        self.pending = True
        self.seen += key_states.shape[2]
        self.tail_keys = torch.cat((self.tail_keys, key_states), dim=2)
        self.tail_values = torch.cat((self.tail_values, value_states), dim=2)
        set_pending(self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.seen - (query_length if self.pending else 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.pages is not None:
            self.pages.close()
        self.__init__(self.owner, self.layer_idx, self.tier_dir)  # type: ignore[misc]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by kvstack caches")

    def shrink_to_fit(self) -> None:
        """Nothing to release: resident tensors are exact."""

    def holds_every_token(self) -> bool:
        return False  # its entries are not dense resident slots

    # ------------------------------------------------------------------ accounting
    def full_pages(self) -> int:
        return self.pages.pages if self.pages is not None else 0

    def kv_bytes(self) -> int:
        """Resident bytes: page minima and maxima, checksums, positions, the newest entries."""
        if not self.is_initialized:
            return 0
        tensors = (self.page_min, self.page_max, self.positions, self.tail_keys, self.tail_values)
        return sum(t.nbytes for t in tensors) + self.pages.checksum_nbytes()

    def tier_bytes(self) -> int:
        """Bytes in the slow tier (the full pages' keys and values)."""
        return self.pages.nbytes() if self.pages is not None else 0

    def full_kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.seen * self.batch * self.heads * self.head_dim * 2 * self.tail_keys.element_size()

    def kept_entries(self) -> int:
        """Every entry is kept (resident or in the tier), summed over sequences and KV heads."""
        return self.seen * self.batch * self.heads if self.is_initialized else 0

    # ------------------------------------------------------------------ the step
    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
               scaling: float, shared: Any = None) -> torch.Tensor:
        """``[B, Hq, q, D]`` queries over the pages read and the resident entries; returns ``[B, q, Hq, D]``."""
        if shared is not None:
            raise RuntimeError("a tiered layer cannot take a shared prompt attention")
        self.pending = False
        batch, q_heads, q_len, _ = query.shape
        causal, valid = chunk_masks(attention_mask, batch, q_len, query.device)
        self._record_positions(position_ids, valid, batch, q_len)
        stored = self.full_pages()
        method = self.owner.method
        count = stored if q_len > 1 else method.pages_read(stored)
        if count == 0:
            pages = torch.empty((batch, self.heads, 0), dtype=torch.long)
        elif count == stored:
            pages = torch.arange(stored).expand(batch, self.heads, stored)
        else:
            grouped = query.view(batch, self.heads, q_heads // self.heads, self.head_dim)
            scores = method.page_scores(grouped, self.page_min, self.page_max)  # [B, H, P]
            pages = scores.topk(count, dim=-1).indices.sort(dim=-1).values.cpu()
        if count:
            read_keys, read_values = self.pages.read(pages)
        else:
            read_keys, read_values = self.tail_keys[:, :, :0], self.tail_values[:, :, :0]
        keys = torch.cat((read_keys.to(self.device), self.tail_keys), dim=2)
        values = torch.cat((read_values.to(self.device), self.tail_values), dim=2)
        past_valid = None
        if self.has_padding:
            in_pages = (pages.unsqueeze(-1) * self.page + torch.arange(self.page)).flatten(2)  # [B, H, k * page]
            page_positions = self.positions[:, : stored * self.page].gather(1, in_pages.flatten(1).to(self.device))
            tail_positions = self.positions[:, stored * self.page :].unsqueeze(1).expand(-1, self.heads, -1)
            past = torch.cat((page_positions.view(batch, self.heads, -1), tail_positions), dim=2)
            past_valid = past[:, :, : keys.shape[2] - q_len] >= 0
        output, _ = attention_with_stats(query, keys, values, causal, past_valid, scaling, set(), 0,
                                         query_valid=valid)
        self._flush()
        return output

    def _record_positions(self, position_ids: torch.Tensor | None, valid: torch.Tensor | None, batch: int,
                          q_len: int) -> None:
        if position_ids is None:
            position_ids = torch.arange(self.seen - q_len, self.seen, device=self.device).unsqueeze(0)
        positions = position_ids.to(torch.int32).expand(batch, -1)
        if valid is not None:
            positions = positions.masked_fill(~valid, -1)
            if not bool(valid.all()):
                self.has_padding = True
        self.positions = torch.cat((self.positions, positions), dim=1)

    def _flush(self) -> None:
        """Move the full pages among the newest entries to the tier, keeping their key minima and maxima."""
        full = self.tail_keys.shape[2] // self.page * self.page
        if full == 0:
            return
        keys, values = self.tail_keys[:, :, :full], self.tail_values[:, :, :full]
        blocks = keys.reshape(self.batch, self.heads, full // self.page, self.page, self.head_dim)
        padding = None
        if self.has_padding:  # padding entries do not widen a page's bounds
            start = self.full_pages() * self.page
            padding = (self.positions[:, start : start + full] < 0).view(self.batch, 1, -1, self.page, 1)
        low = blocks.masked_fill(padding, float("inf")) if padding is not None else blocks
        high = blocks.masked_fill(padding, float("-inf")) if padding is not None else blocks
        self.pages.append(keys, values)
        low, high = low.amin(dim=3), high.amax(dim=3)
        if padding is not None:  # a page of padding only: bounds of 0 (it may be read; its entries are masked)
            low, high = low.masked_fill(torch.isinf(low), 0.0), high.masked_fill(torch.isinf(high), 0.0)
        self.page_min = torch.cat((self.page_min, low), dim=2)
        self.page_max = torch.cat((self.page_max, high), dim=2)
        self.tail_keys = self.tail_keys[:, :, full:].clone()
        self.tail_values = self.tail_values[:, :, full:].clone()
