"""A layer that keeps every entry, in pages in a slower tier, and reads only some pages per decoding step.

For page-reading policies (Quest). Per layer:

* resident: each full page's summary from the policy (Quest: element-wise key minimum and maximum,
  ``[B, H, P, D]`` each, or its keys' low-rank coordinates and the layer's basis; InfLLM: representative
  keys), each page block's checksum (``[P, B, H]`` uint64), the
  true positions of every entry (``[B, N]`` int32, padding ``-1``), the policy's sinks and window and the
  entries between them that do not fill a page yet, and an LRU of pages read recently (if the policy keeps
  one);
* in the tier: every full page, one block of ``[2, page, D]`` (keys then values) per ``(page, sequence,
  head)``, in one file read with ``preadv`` (:class:`PageFile`, the CPU case) or in host memory when the model runs
  on a GPU (:class:`HostPages`).

A decoding step (one new token) asks the policy to score each page from its summary (or, when the policy says
its scores have a standard form of the contract's ``PAGE_SCORE_FORMS``, scores and ranks them in one fused
kernel call), reads the top pages
(checked against their checksums) and attends exactly over them and the resident entries; a prompt chunk
reads every page, :data:`PROMPT_READ_TOKENS` entries at a time with an online softmax (exact attention whose
transient is one group of pages, not the layer). Full pages leave the resident set after the forward that filled them.
``kv_bytes()`` counts the resident tensors; ``tier_bytes()`` the file.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvstack.cache import kernels
from kvstack.cache.attention_stats import attention_with_stats
from kvstack.cache.blockwise import Block, blockwise_attention
from kvstack.cache.owned_layer import OwnedLayer
from kvstack.contract import PAGE_SCORE_KEY_BOUND, PAGE_SCORE_LOWRANK, STAT_COLSUM
from kvstack.errors import KVStackError

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache

__all__ = ["PROMPT_READ_TOKENS", "HostPages", "PageCache", "PageFile", "PageStore", "TierError", "TieredLayer",
           "check_tier_dir"]

PROMPT_READ_TOKENS = 1024
"""Tier entries a prompt chunk reads at a time (one online-softmax block): its transient, however long the context."""

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
    """``[n]`` uint64 checksums of ``[n, words]`` uint32 blocks: the words' sum (mod 2^32) in the low half and
    their xor in the high half. Two reductions and no temporary, so every read can afford it; a changed,
    flipped or zeroed word changes it (two words swapped within a block would not)."""
    total = blocks.sum(axis=1, dtype=np.uint64) & np.uint64(0xFFFFFFFF)
    return total | (np.bitwise_xor.reduce(blocks, axis=1).astype(np.uint64) << np.uint64(32))


class PageStore:
    """What both tiers share: block ``(page, sequence, head)`` is record ``(page * B + sequence) * H + head``, and a
    read of pages ``[B, H, k]`` is a read of their records. Subclasses hold the blocks (``read_records``)."""

    batch: int
    heads: int
    page: int
    head_dim: int

    def records(self, pages: torch.Tensor) -> np.ndarray:
        """``[B * H * k]`` record numbers of the pages ``[B, H, k]`` each (sequence, head) reads."""
        batch, heads, _ = pages.shape
        sequence = torch.arange(batch).view(batch, 1, 1)
        head = torch.arange(heads).view(1, heads, 1)
        return ((pages.cpu() * batch + sequence) * heads + head).reshape(-1).numpy()

    def read_records(self, records: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, page, D]`` of blocks ``records``."""
        raise NotImplementedError

    def read_into(self, records: np.ndarray, slots: torch.Tensor, rows: np.ndarray) -> None:
        """Blocks ``records`` ``[n]`` into rows ``rows`` ``[n]`` of ``slots`` ``[2, C, page, D]`` (keys, values).

        A block that fails its check raises :class:`TierError`; the rows may then hold part of what was read.
        """
        keys, values = self.read_records(records)
        index = torch.from_numpy(rows).to(slots.device)
        slots[0].index_copy_(0, index, keys.to(slots.device))
        slots[1].index_copy_(0, index, values.to(slots.device))

    def read(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, k * page, D]`` of the pages ``[B, H, k]`` each (sequence, head) reads."""
        batch, heads, count = pages.shape
        keys, values = self.read_records(self.records(pages))
        shape = (batch, heads, count * self.page, self.head_dim)
        return keys.reshape(shape), values.reshape(shape)


class PageFile(PageStore):
    """Full pages in one file: record ``(page * B + sequence) * H + head`` is block ``(page, sequence, head)``, its
    keys ``[page, D]`` then its values ``[page, D]`` (so one read brings both); each half has a checksum.

    The file is removed when the object is collected.
    """

    HALVES = ("keys", "values")

    def __init__(self, directory: str, batch: int, heads: int, page: int, head_dim: int, dtype: torch.dtype) -> None:
        self.batch, self.heads, self.page, self.head_dim, self.dtype = batch, heads, page, head_dim, dtype
        self.element = torch.empty((), dtype=dtype).element_size()
        if self.element not in (2, 4):
            raise TierError(f"the slow tier holds 16- or 32-bit entries, not {dtype}")
        self.block_bytes = page * head_dim * self.element  # one half of a record: its keys (or its values)
        if self.block_bytes % 4:
            raise TierError(f"a page block of {self.block_bytes} bytes does not hold whole 32-bit words")
        fd, self.path = tempfile.mkstemp(prefix="kvstack-tier-", suffix=".pages", dir=directory)
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, self.path)
        self.pages = 0
        self.checksums = np.empty((2, 0), dtype=np.uint64)  # keys, values: [2, records]
        self._fd: int | None = None  # the read descriptor, opened on the first read

    def nbytes(self) -> int:
        """Bytes the file holds."""
        return 2 * self.pages * self.batch * self.heads * self.block_bytes

    def checksum_nbytes(self) -> int:
        return self.checksums.nbytes

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write full pages: ``keys``, ``values`` ``[B, H, n * page, D]``."""
        count = keys.shape[2] // self.page
        both = torch.stack((keys, values), dim=2).reshape(self.batch, self.heads, 2, count, self.page, self.head_dim)
        blocks = both.permute(3, 0, 1, 2, 4, 5).contiguous().cpu()  # [n, B, H, 2, page, D]
        raw = blocks.view(torch.uint8).numpy().reshape(count * self.batch * self.heads, 2, self.block_bytes)
        sums = np.stack([block_checksums(raw[:, half].view(np.uint32)) for half in (0, 1)])
        with open(self.path, "ab") as handle:
            handle.write(raw.data)
        self.pages += count
        self.checksums = np.concatenate((self.checksums, sums), axis=1)

    def read_records(self, records: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, page, D]`` of blocks ``records``, each checked against its checksums first.

        Read with ``preadv``, one call per run of consecutive records, straight into the answer's buffer: the
        pages go through the OS's file cache and never enter this process's mappings (a memory map would let
        fault-around map most of a layer's file for a few scattered reads).
        """
        order = np.argsort(records, kind="stable")
        ordered = records[order]
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        starts = np.concatenate(([0], breaks))
        stops = np.concatenate((breaks, [len(ordered)]))
        raw = np.empty((len(records), 2, self.block_bytes), dtype=np.uint8)  # in record order, below
        fd = self.descriptor()
        for first, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            want = (stop - first) * 2 * self.block_bytes
            got = os.preadv(fd, [memoryview(raw[first:stop]).cast("B")], int(ordered[first]) * 2 * self.block_bytes)
            if got != want:
                raise self.refused(0, None)
        if not np.array_equal(order, np.arange(len(records))):
            raw = raw[np.argsort(order)]
        out = []
        for half in (0, 1):
            bad = np.nonzero(block_checksums(raw[:, half].view(np.uint32)) != self.checksums[half, records])[0]
            if bad.size:
                raise self.refused(half, int(records[bad[0]]))
            block = np.ascontiguousarray(raw[:, half])
            out.append(torch.from_numpy(block).view(self.dtype).view(len(records), self.page, self.head_dim))
        return out[0], out[1]

    def read_into(self, records: np.ndarray, slots: torch.Tensor, rows: np.ndarray) -> None:
        """As :meth:`PageStore.read_into`; with the fused kernels (CPU slots), ``preadv`` reads straight into the
        slots, one call per run of consecutive records, and the checksums are taken there (no staging copy)."""
        if not (slots.device.type == "cpu" and slots.is_contiguous() and records.size and kernels.available()):
            super().read_into(records, slots, rows)
            return
        order = np.argsort(records, kind="stable")
        ordered = torch.from_numpy(np.ascontiguousarray(records[order]))
        into = torch.from_numpy(np.ascontiguousarray(rows[order]))
        expected = torch.from_numpy(np.ascontiguousarray(self.checksums[:, records[order]]).view(np.int64))
        failed = kernels.read_file_blocks(self.descriptor(), ordered, self.block_bytes, slots, into, expected)
        if failed is not None:
            half, index = failed
            raise self.refused(half, None if index is None else int(ordered[index]))

    def descriptor(self) -> int:
        """The file's read descriptor, opened on the first read."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def refused(self, half: int, record: int | None) -> TierError:
        """The error for a record whose keys (``half`` 0) or values (1) fail their checksum (``record``), or for a
        file cut short (None)."""
        if record is None:
            return TierError(f"the slow tier {self.path} is shorter than its pages; it is refused")
        page = record // (self.batch * self.heads)
        return TierError(f"page {page} of the slow tier {self.path} ({self.HALVES[half]}) fails its checksum; it is "
                         "refused, not read")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._finalizer()


class HostPages(PageStore):
    """Full pages in host memory, for a model on a GPU: the same blocks and reads as :class:`PageFile`, in
    (pinned, where CUDA is available) CPU tensors that grow by whole pages; read blocks go to the GPU."""

    def __init__(self, batch: int, heads: int, page: int, head_dim: int, dtype: torch.dtype) -> None:
        self.batch, self.heads, self.page, self.head_dim, self.dtype = batch, heads, page, head_dim, dtype
        self.pages = 0
        self.blocks = torch.empty((0, 2, page, head_dim), dtype=dtype)  # [records, keys | values, page, D]

    def nbytes(self) -> int:
        return self.pages * self.batch * self.heads * 2 * self.page * self.head_dim * self.blocks.element_size()

    def checksum_nbytes(self) -> int:
        return 0  # host memory is not a medium that corrupts at rest; the file tier checks its pages

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep full pages: ``keys``, ``values`` ``[B, H, n * page, D]``."""
        count = keys.shape[2] // self.page
        blocks = torch.stack((keys, values), dim=2).view(self.batch, self.heads, 2, count, self.page, self.head_dim)
        blocks = blocks.permute(3, 0, 1, 2, 4, 5).reshape(-1, 2, self.page, self.head_dim).cpu()
        grown = torch.cat((self.blocks, blocks))
        self.blocks = grown.pin_memory() if torch.cuda.is_available() else grown
        self.pages += count

    def read_records(self, records: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = self.blocks[torch.from_numpy(records)]
        return chosen[:, 0], chosen[:, 1]

    def close(self) -> None:
        self.blocks = self.blocks[:0]


class PageCache:
    """Tier blocks read recently, kept resident: an LRU of ``capacity`` blocks in preallocated slots.

    Slots ``[2, capacity, page, D]`` (keys, then values); ``slot_of[record]`` (``-1``: not cached) and
    ``record_of[slot]`` map between tier records and slots; ``stamp[slot]`` is the read that last used it.
    A read is vectorised: the hits are stamped, the misses read from the tier in one call into the least
    recently used slots, and the answer gathered from the slots.
    """

    def __init__(self, capacity: int, page: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.capacity = capacity
        self.slots = torch.zeros((2, capacity, page, head_dim), dtype=dtype, device=device)
        self.slot_of = np.full(0, -1, dtype=np.int64)
        self.record_of = np.full(capacity, -1, dtype=np.int64)
        self.stamp = np.full(capacity, -1, dtype=np.int64)  # -1: never used, the first to go
        self.reads = 0
        self.misses = 0  # blocks read from the tier, over the cache's life

    def nbytes(self) -> int:
        return self.slots.nbytes + self.record_of.nbytes + self.stamp.nbytes + self.slot_of.nbytes

    def __len__(self) -> int:
        return int((self.record_of >= 0).sum())

    def locate(self, records: np.ndarray, store: PageStore) -> np.ndarray:
        """``[n]`` the slots holding the ``n`` distinct ``records`` (``n <= capacity``), reading the misses.

        A block refused by the tier leaves the slots read into empty (never taken for that record later).
        """
        if self.slot_of.size <= records.max():
            grown = np.full(max(int(records.max()) + 1, 2 * self.slot_of.size), -1, dtype=np.int64)
            grown[: self.slot_of.size] = self.slot_of
            self.slot_of = grown
        self.reads += 1
        slots = self.slot_of[records]
        missing = slots < 0
        self.stamp[slots[~missing]] = self.reads
        if missing.any():
            wanted = records[missing]
            victims = np.argpartition(self.stamp, wanted.size - 1)[: wanted.size] if wanted.size < self.capacity \
                else np.arange(self.capacity)
            evicted = self.record_of[victims]
            self.slot_of[evicted[evicted >= 0]] = -1
            self.record_of[victims] = -1
            try:
                store.read_into(wanted, self.slots, victims)
            except TierError:
                self.stamp[victims] = -1
                raise
            self.record_of[victims] = wanted
            self.slot_of[wanted] = victims
            self.stamp[victims] = self.reads
            slots[missing] = victims
            self.misses += int(wanted.size)
        return slots

    def locate_pages(self, pages: torch.Tensor, store: PageStore) -> torch.Tensor:
        """``[B, H, k]`` the slots holding ``pages`` ``[B, H, k]`` (distinct per sequence and head, ``B H k <=
        capacity``), reading the misses: :meth:`locate` of their records, in one fused call
        (:func:`kernels.page_cache_read`, the same choices) for a file tier and CPU slots."""
        fused = isinstance(store, PageFile) and self.slots.device.type == "cpu" and self.slots.is_contiguous()
        if not (fused and kernels.available()):
            return torch.from_numpy(self.locate(store.records(pages), store)).view(pages.shape)
        records = store.pages * store.batch * store.heads  # every record is below this
        if self.slot_of.size < records:
            grown = np.full(max(records, 2 * self.slot_of.size), -1, dtype=np.int64)
            grown[: self.slot_of.size] = self.slot_of
            self.slot_of = grown
        self.reads += 1
        slots, (half, mismatch, record, read) = kernels.page_cache_read(
            pages, torch.from_numpy(self.slot_of), torch.from_numpy(self.record_of), torch.from_numpy(self.stamp),
            self.reads, store.descriptor(), store.block_bytes, self.slots,
            torch.from_numpy(store.checksums.view(np.int64)))
        if half >= 0:
            raise store.refused(half, record if mismatch >= 0 else None)
        self.misses += read
        return slots

    def read(self, records: np.ndarray, store: PageStore) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, page, D]`` of the ``n`` distinct ``records`` (``n <= capacity``)."""
        slots = self.locate(records, store)
        gathered = self.slots.index_select(1, torch.from_numpy(slots).to(self.slots.device))  # [2, n, page, D]
        return gathered[0], gathered[1]


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class TieredLayer(OwnedLayer):
    """One layer of a page-reading policy's cache (see the module docstring)."""

    def __init__(self, owner: KVStackCache, layer_idx: int, tier_dir: str) -> None:
        super().__init__(owner, layer_idx)
        self.tier_dir = tier_dir
        self.pages: PageStore | None = None
        self.summary: dict[str, torch.Tensor] = {}  # name -> [B, H, P, ...] what stays resident of each page
        self.lru: PageCache | None = None  # tier pages read recently, resident (if the policy keeps any)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        method = self.owner.method
        self.page = method.page_size()
        self.sinks, self.window = method.resident_entries()
        self.tracks_importance = STAT_COLSUM in method.needs
        if self.device.type == "cuda":  # the slower tier of a GPU is host memory
            self.pages = HostPages(self.batch, self.heads, self.page, self.head_dim, self.dtype)
        else:
            self.pages = PageFile(self.tier_dir, self.batch, self.heads, self.page, self.head_dim, self.dtype)
        self.tail_keys = key_states.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.tail_values = value_states.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.tail_importance = torch.empty((self.batch, self.heads, 0), dtype=torch.float32, device=self.device)
        self.positions = torch.empty((self.batch, 0), dtype=torch.int32, device=self.device)

    def _take_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The chunk joins the resident entries until its attention (next)."""
        self.tail_keys = torch.cat((self.tail_keys, key_states), dim=2)
        self.tail_values = torch.cat((self.tail_values, value_states), dim=2)
        if self.tracks_importance:
            fresh = self.tail_importance.new_zeros((self.batch, self.heads, key_states.shape[2]))
            self.tail_importance = torch.cat((self.tail_importance, fresh), dim=2)

    def reset(self) -> None:
        if self.pages is not None:
            self.pages.close()
        self.__init__(self.owner, self.layer_idx, self.tier_dir)  # type: ignore[misc]

    # ------------------------------------------------------------------ accounting
    def full_pages(self) -> int:
        return self.pages.pages if self.pages is not None else 0

    def kv_bytes(self) -> int:
        """Resident bytes: page summaries, checksums, positions, the resident entries (and their accumulated
        attention), the pages cached from the tier."""
        if not self.is_initialized:
            return 0
        tensors = [self.positions, self.tail_keys, self.tail_values, self.tail_importance, *self.summary.values()]
        cached = self.lru.nbytes() if self.lru is not None else 0
        return sum(t.nbytes for t in tensors) + self.pages.checksum_nbytes() + cached

    def tier_bytes(self) -> int:
        """Bytes in the slow tier (the full pages' keys and values)."""
        return self.pages.nbytes() if self.pages is not None else 0

    def kept_entries(self) -> int:
        """Every entry is kept (resident or in the tier), summed over sequences and KV heads."""
        return self.seen * self.batch * self.heads if self.is_initialized else 0

    def sink_count(self) -> int:
        """Entries at the start of the resident ones that are sinks (the first ``sinks`` tokens)."""
        return min(self.sinks, self.seen)

    # ------------------------------------------------------------------ the step
    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
               scaling: float, shared: Any = None) -> torch.Tensor:
        """``[B, Hq, q, D]`` queries over the pages read and the resident entries; returns ``[B, q, Hq, D]``."""
        causal, valid, positions = self.start_attention(query, attention_mask, position_ids, shared)
        self.positions = torch.cat((self.positions, positions), dim=1)
        batch, q_heads, q_len, _ = query.shape
        stored = self.full_pages()
        if q_len > 1 and stored:
            return self._attend_prompt_chunk(query, causal, valid, scaling)
        method = self.owner.method
        count = stored if q_len > 1 else method.pages_read(stored)
        if count == stored:
            pages = torch.arange(stored).expand(batch, self.heads, stored)
        else:
            grouped = query.view(batch, self.heads, q_heads // self.heads, self.head_dim)
            if self._attends_in_place(query, count):  # in any order: the softmax is over a set
                pages = self._top_pages(grouped, count)
                lru = self._page_cache()
                slot_index = lru.locate_pages(pages, self.pages)
                output = kernels.selected_page_attention(
                    query.reshape(batch, q_heads, self.head_dim), lru.slots[0].unsqueeze(1), lru.slots[1].unsqueeze(1),
                    slot_index, self.tail_keys, self.tail_values, scaling)
                self._flush()
                return output.view(batch, 1, q_heads, self.head_dim)
            scores = method.page_scores(grouped, self.summary)  # [B, H, P]
            pages = scores.topk(count, dim=-1).indices.cpu().sort(dim=-1).values  # in arrival order, as kept
        read_keys, read_values = self._read(pages)
        sinks = self.sink_count()
        if read_keys.shape[2] == 0:  # nothing in the tier yet (a first prompt chunk): no copy
            keys, values = self.tail_keys, self.tail_values
        else:
            keys = torch.cat((self.tail_keys[:, :, :sinks], read_keys.to(self.device), self.tail_keys[:, :, sinks:]),
                             dim=2)
            values = torch.cat((self.tail_values[:, :, :sinks], read_values.to(self.device),
                                self.tail_values[:, :, sinks:]), dim=2)
        past_valid = None
        if self.has_padding:
            past = self._entry_positions(pages, sinks, stored)
            past_valid = past[:, :, : keys.shape[2] - q_len] >= 0
        needs = {STAT_COLSUM} if self.tracks_importance else set()
        output, stats = attention_with_stats(query, keys, values, causal, past_valid, scaling, needs, 0,
                                             query_valid=valid)
        if self.tracks_importance:  # what the resident entries received, for the pages they will form
            read = read_keys.shape[2]
            received = torch.cat((stats.colsum[:, :, :sinks], stats.colsum[:, :, sinks + read :]), dim=2)
            self.tail_importance = self.tail_importance + received.float()
        self._flush()
        return output

    def _attend_prompt_chunk(self, query: torch.Tensor, causal: torch.Tensor | None, valid: torch.Tensor | None,
                             scaling: float) -> torch.Tensor:
        """``[B, q, Hq, D]``: a prompt chunk's ``[B, Hq, q, D]`` queries over every entry, exactly, in blocks: the
        sinks, the tier's pages :data:`PROMPT_READ_TOKENS` entries at a time, then the other resident entries
        (the chunk last, causal). Statistics (InfLLM's column sums) cover the resident entries only."""
        batch, _, q_len, _ = query.shape
        sinks, stored, page = self.sink_count(), self.full_pages(), self.page
        rest_start = sinks + stored * page  # arrival index of the first resident entry after the sinks
        past = self.tail_keys.shape[2] - sinks - q_len  # resident entries between the pages and the chunk
        padding_query = None if valid is None else ~valid.view(batch, 1, q_len, 1)

        def visible(first: int, stop: int) -> torch.Tensor | None:
            """``[B, 1, q, n]`` what each query sees of the entries with arrival index ``first:stop`` before the
            chunk (None: everything); a padding query sees everything (its output is never used)."""
            if not self.has_padding:
                return None
            mask = (self.positions[:, first:stop] >= 0).view(batch, 1, 1, -1).expand(-1, -1, q_len, -1)
            return mask if padding_query is None else mask | padding_query

        def resident() -> Iterator[Block]:
            if sinks:
                yield self.tail_keys[:, :, :sinks], self.tail_values[:, :, :sinks], visible(0, sinks)
            chunk = causal if causal is not None else torch.ones(q_len, q_len, dtype=torch.bool,
                                                                   device=query.device).tril().view(1, 1, q_len, q_len)
            earlier = visible(rest_start, rest_start + past)
            if earlier is None:
                earlier = torch.ones(1, 1, q_len, past, dtype=torch.bool, device=query.device)
            rows = max(earlier.shape[0], chunk.shape[0])
            mask = torch.cat((earlier.expand(rows, -1, -1, -1), chunk.expand(rows, -1, -1, -1)), dim=-1)
            if padding_query is not None:
                mask = mask | padding_query
            yield self.tail_keys[:, :, sinks:], self.tail_values[:, :, sinks:], mask

        def every() -> Iterator[Block]:
            resident_blocks = resident()
            if sinks:
                yield next(resident_blocks)
            group = max(1, PROMPT_READ_TOKENS // page)
            for first in range(0, stored, group):
                pages = torch.arange(first, min(stored, first + group)).expand(batch, self.heads, -1)
                keys, values = self.pages.read(pages)
                yield (keys.to(self.device), values.to(self.device),
                       visible(sinks + first * page, sinks + (first + pages.shape[-1]) * page))
            yield from resident_blocks

        needs = {STAT_COLSUM} if self.tracks_importance else set()
        output, stats = blockwise_attention(query, every, scaling, needs, 0, valid, stats_blocks=resident)
        if self.tracks_importance:  # what the resident entries received, for the pages they will form
            self.tail_importance = self.tail_importance + stats.colsum.float()
        self._flush()
        return output

    def _attends_in_place(self, query: torch.Tensor, count: int) -> bool:
        """Whether a decoding step that reads ``count`` pages per head can attend in one fused call over the page
        cache's slots and the resident entries (:func:`kernels.selected_page_attention`): float32 on the CPU, no
        padding to mask, no statistics to collect, and the step's pages fit the cache."""
        if self.has_padding or self.tracks_importance or query.device.type != "cpu":
            return False
        if query.dtype != torch.float32 or self.dtype != torch.float32:
            return False
        return self.owner.method.cached_pages() >= count and kernels.available()

    def _top_pages(self, query: torch.Tensor, count: int) -> torch.Tensor:
        """``[B, H, count]`` the pages with the highest scores for ``query`` ``[B, H, G, D]``, in no particular
        order: with a fused kernel when the policy's scores have a standard form, else from its ``page_scores``."""
        form = self.owner.method.page_score_form()
        if form == PAGE_SCORE_KEY_BOUND:
            return kernels.key_bound_top_pages(query, self.summary["min"], self.summary["max"], count)
        if form == PAGE_SCORE_LOWRANK:
            basis = self.summary.get("basis")  # none: the coordinates are the keys themselves
            query_coordinates = query.float() if basis is None else query.float() @ basis.float()
            return kernels.lowrank_top_pages(query_coordinates, self.summary["coordinates"], count,
                                             self.summary.get("scale"))
        return self.owner.method.page_scores(query, self.summary).topk(count, dim=-1).indices

    def _page_cache(self) -> PageCache:
        """The cache of recently read pages (made on first use): ``cached_pages()`` per (sequence, head)."""
        if self.lru is None:
            capacity = self.owner.method.cached_pages() * self.batch * self.heads
            self.lru = PageCache(capacity, self.page, self.head_dim, self.dtype, self.device)
        return self.lru

    def _entry_positions(self, pages: torch.Tensor, sinks: int, stored: int) -> torch.Tensor:
        """``[B, H, sinks + k * page + rest]`` positions of the entries attended, in attention order."""
        batch = pages.shape[0]
        in_pages = (sinks + pages.unsqueeze(-1) * self.page + torch.arange(self.page)).flatten(2)  # arrival indices
        page_positions = self.positions.gather(1, in_pages.flatten(1).to(self.device)).view(batch, self.heads, -1)
        head_view = self.positions.unsqueeze(1).expand(-1, self.heads, -1)
        return torch.cat((head_view[:, :, :sinks], page_positions, head_view[:, :, sinks + stored * self.page :]),
                         dim=2)

    def _read(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, k * page, D]`` of ``pages`` ``[B, H, k]``: through the cache of recently read
        pages when the policy keeps one (and a step's pages fit it), else straight from the tier."""
        batch, heads, count = pages.shape
        shape = (batch, heads, count * self.page, self.head_dim)
        capacity = self.owner.method.cached_pages() * batch * heads
        if count == 0:
            empty = self.tail_keys.new_empty(shape)
            return empty, empty.clone()
        if capacity < count * batch * heads:
            return self.pages.read(pages)
        keys, values = self._page_cache().read(self.pages.records(pages), self.pages)
        return keys.reshape(shape), values.reshape(shape)

    def _flush(self) -> None:
        """Move whole pages from between the sinks and the window to the tier, keeping their summaries."""
        sinks = self.sink_count()
        movable = self.tail_keys.shape[2] - sinks - self.window
        full = max(0, movable) // self.page * self.page
        if full == 0:
            return
        count = full // self.page
        keys = self.tail_keys[:, :, sinks : sinks + full]
        values = self.tail_values[:, :, sinks : sinks + full]
        start = self.sinks + self.full_pages() * self.page  # arrival index of the first entry moved
        valid = (self.positions[:, start : start + full] >= 0).view(self.batch, 1, count, self.page)
        importance = None
        if self.tracks_importance:
            importance = self.tail_importance[:, :, sinks : sinks + full].reshape(self.batch, self.heads, count,
                                                                                 self.page)
        blocks = keys.reshape(self.batch, self.heads, count, self.page, self.head_dim)
        method = self.owner.method
        summary = method.page_summary(blocks, valid, importance, self.summary)
        self.pages.append(keys, values)
        layer_wide = method.layer_summary_names()
        for name, tensor in summary.items():
            held = self.summary.get(name)
            self.summary[name] = tensor if held is None or name in layer_wide else torch.cat((held, tensor), dim=2)

        def without_moved(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat((tensor[:, :, :sinks], tensor[:, :, sinks + full :]), dim=2)

        self.tail_keys, self.tail_values = without_moved(self.tail_keys), without_moved(self.tail_values)
        if self.tracks_importance:
            self.tail_importance = without_moved(self.tail_importance)
