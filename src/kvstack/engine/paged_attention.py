"""Attention read straight through block tables from the paged KV pool.

:func:`paged_attention_packed` is what the runner calls for a packed step (the fused CPU kernel where it can,
a matrix-product SDPA for long chunks); :func:`paged_attention` is the PyTorch path (online softmax, per
sequence). ``docs/engine-design.md`` (section "Paged KV") describes how the engine uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvstack.cache import kernels
from kvstack.engine.paged import BlockTable, PagedKVPool, table_to_list
from kvstack.engine.quest_attention import quest_blocks_read, quest_decode_attention, quest_decode_batch
from kvstack.errors import KVStackError
from kvstack.methods.base import Method

__all__ = ["DENSE_MIN_QUERIES", "FALLBACK_BLOCKS_PER_STEP", "PackedPlan", "paged_attention", "paged_attention_packed"]

FALLBACK_BLOCKS_PER_STEP = 64
"""Blocks gathered at once by the PyTorch path of :func:`paged_attention` (one online-softmax step each)."""


def paged_attention(
    query: Sequence[torch.Tensor],
    pool: PagedKVPool,
    layer: int,
    block_tables: Sequence[BlockTable],
    context_lens: Sequence[int],
    scaling: float,
    causal_offsets: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Attention of a batch of sequences over their KV read block by block from the pool.

    Parameters
    ----------
    query : sequence of torch.Tensor
        One ``[Hq, q_i, D]`` tensor per sequence: the queries of its ``q_i`` new tokens. ``Hq`` is a multiple
        of the pool's ``H``; query head ``h * G + g`` (``G = Hq // H``) reads KV head ``h``.
    pool : PagedKVPool
        The KV pool; the new tokens' keys/values must already be written.
    layer : int
        Layer index.
    block_tables : sequence of block tables
        One block table (sequence of int or 1-D tensor) per sequence.
    context_lens : sequence of int
        Tokens stored per sequence, the new ones included.
    scaling : float
        Multiplier of the logits, usually ``head_dim ** -0.5``.
    causal_offsets : sequence of int, optional
        Position of the first query token of each sequence; query ``j`` sees key positions
        ``<= causal_offsets[i] + j``. Default ``context_lens[i] - q_i`` (the queries are the last ``q_i``
        tokens, as in prefill chunks and decode). Must lie in ``0 .. context_lens[i] - q_i``.

    Returns
    -------
    list of torch.Tensor
        One ``[Hq, q_i, D]`` output per sequence, in the query's dtype and on its device.

    Raises
    ------
    KVStackError
        On mismatched batch sizes, shapes, heads, lengths, offsets or block tables too short.

    Notes
    -----
    Online softmax (as in FlashAttention) per sequence, in float32, reading up to
    :data:`FALLBACK_BLOCKS_PER_STEP` blocks at a time (see :func:`_online_softmax_attention`). The engine's
    runner calls :func:`paged_attention_packed`, which uses the fused kernel when it can and this function
    otherwise.
    """
    batch = len(query)
    if len(block_tables) != batch or len(context_lens) != batch:
        raise KVStackError(
            f"query, block_tables and context_lens must have one entry per sequence, got {batch}, "
            f"{len(block_tables)} and {len(context_lens)}"
        )
    if causal_offsets is not None and len(causal_offsets) != batch:
        raise KVStackError(f"causal_offsets must have one entry per sequence, got {len(causal_offsets)} for {batch}")
    pool._check_layer(layer)
    outputs: list[torch.Tensor] = []
    for seq_index in range(batch):
        seq_query = query[seq_index]
        context_len = context_lens[seq_index]
        offset = _checked_sequence(pool, seq_index, seq_query, context_len,
                                   None if causal_offsets is None else causal_offsets[seq_index])
        num_new = seq_query.shape[1]
        if num_new == 0:
            outputs.append(seq_query.new_empty(seq_query.shape))
            continue
        last_visible = offset + num_new  # keys at positions >= this are seen by no query
        table = table_to_list(block_tables[seq_index], -(-last_visible // pool.block_size), pool.num_blocks,
                              f"attending over {last_visible} tokens of sequence {seq_index}")
        output = _online_softmax_attention(seq_query, pool, layer, table, offset, context_len, scaling)
        outputs.append(output.to(device=seq_query.device, dtype=seq_query.dtype))
    return outputs


def _checked_sequence(
    pool: PagedKVPool, seq_index: int, seq_query: torch.Tensor, context_len: int, offset: int | None
) -> int:
    """Check sequence ``seq_index``'s query ``[Hq, q, D]``, context length and causal offset (None: the queries
    are the last ``q`` tokens); return the offset.

    Raises
    ------
    KVStackError
        On a bad shape, heads, context length or offset.
    """
    heads, dim = pool.num_kv_heads, pool.head_dim
    if not isinstance(seq_query, torch.Tensor) or seq_query.dim() != 3 or seq_query.shape[2] != dim or (
        seq_query.shape[0] % heads != 0
    ):
        got = tuple(seq_query.shape) if isinstance(seq_query, torch.Tensor) else type(seq_query).__name__
        raise KVStackError(
            f"query {seq_index} must be [Hq, q, head_dim={dim}] with Hq a multiple of num_kv_heads={heads}, "
            f"got {got}"
        )
    num_new = seq_query.shape[1]
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < num_new:
        raise KVStackError(
            f"context_lens[{seq_index}] must be an integer >= its {num_new} query tokens, got {context_len!r}"
        )
    offset = context_len - num_new if offset is None else offset
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= context_len - num_new:
        raise KVStackError(
            f"causal_offsets[{seq_index}] must be an integer in 0..{context_len - num_new}, got {offset!r}"
        )
    return offset


def _online_softmax_attention(
    seq_query: torch.Tensor, pool: PagedKVPool, layer: int, table: list[int], offset: int, context_len: int,
    scaling: float,
) -> torch.Tensor:
    """``[Hq, q, D]`` float32 attention of one sequence's queries over the blocks of ``table``, on the pool's device.

    Online softmax (as in FlashAttention), with the queries grouped per KV head, ``q : [H, G * q, D]`` (row
    ``g * q + j`` is query ``j`` of head ``h * G + g``), float32:

    * state: running max ``m : [H, G * q]``, running sum ``l : [H, G * q]``, accumulator ``acc : [H, G * q, D]``;
    * for each run of up to :data:`FALLBACK_BLOCKS_PER_STEP` blocks covering positions up to the last query's:
      ``k, v : [H, n, D]`` gathered from the pool (GQA by broadcasting, never repeated), scores
      ``s = q @ k^T * scaling : [H, G * q, n]`` with positions past ``context_len`` or after the query (query
      ``j`` sits at position ``offset + j``) masked to ``-inf``;
      ``m' = max(m, rowmax(s))``, ``p = exp(s - m')``, ``c = exp(m - m')``, ``l = l * c + rowsum(p)``,
      ``acc = acc * c + p @ v``, ``m = m'``;
    * output ``acc / l``, reshaped ``[H, G, q, D] -> [Hq, q, D]``.

    Transient memory is one run of scores, ``[H, G * q, n]``, however long the context.
    """
    heads, dim, block_size = pool.num_kv_heads, pool.head_dim, pool.block_size
    layer_kv = pool.kv[:, layer]  # [num_blocks, 2, H, block_size, D], a view
    num_q_heads, num_new, _ = seq_query.shape
    group = num_q_heads // heads
    # [Hq, q, D] -> [H, G, q, D] -> [H, G*q, D]: row g*q + j is query j of head h*G + g.
    grouped = seq_query.to(device=pool.device, dtype=torch.float32).reshape(heads, group * num_new, dim)
    query_positions = (offset + torch.arange(num_new, device=pool.device)).repeat(group)  # [G*q]
    running_max = torch.full((heads, group * num_new), float("-inf"), device=pool.device)
    running_sum = torch.zeros((heads, group * num_new), device=pool.device)
    accumulator = torch.zeros((heads, group * num_new, dim), device=pool.device)
    for first in range(0, len(table), FALLBACK_BLOCKS_PER_STEP):
        group_ids = torch.tensor(table[first : first + FALLBACK_BLOCKS_PER_STEP], device=pool.device)
        # [n, 2, H, block_size, D] -> [2, H, n * block_size, D]: keys and values of these blocks, contiguous.
        gathered = layer_kv.index_select(0, group_ids).permute(1, 2, 0, 3, 4).float()
        gathered = gathered.reshape(2, heads, len(group_ids) * block_size, dim)
        key_positions = first * block_size + torch.arange(len(group_ids) * block_size, device=pool.device)
        # [G*q, n*block_size]: causal (key <= query position) and inside the stored context.
        visible = (key_positions[None, :] <= query_positions[:, None]) & (key_positions[None, :] < context_len)
        scores = torch.matmul(grouped, gathered[0].transpose(-1, -2)) * scaling  # [H, G*q, n*block_size]
        scores = scores.masked_fill(~visible, float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(dim=-1))  # [H, G*q]
        # A row with nothing visible yet keeps max -inf; subtract 0 there so exp gives 0, not NaN.
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(scores - safe_max[..., None])  # [H, G*q, n*block_size]
        correction = torch.exp(running_max - safe_max)  # [H, G*q]
        running_sum = running_sum * correction + probs.sum(dim=-1)
        accumulator = accumulator * correction[..., None] + torch.matmul(probs, gathered[1])
        running_max = new_max
    output = accumulator / running_sum[..., None]  # [H, G*q, D]
    return output.reshape(num_q_heads, num_new, dim)


def paged_attention_packed(
    query: torch.Tensor,
    pool: PagedKVPool,
    layer: int,
    block_tables: Sequence[BlockTable],
    num_new_tokens: Sequence[int],
    context_lens: Sequence[int],
    scaling: float,
    plan: PackedPlan | None = None,
) -> torch.Tensor:
    """Attention of a packed row of new tokens from several sequences, each over its own paged context.

    Parameters
    ----------
    query : torch.Tensor
        ``[T, Hq, D]`` queries of the packed tokens: sequence ``i``'s ``q_i`` new tokens follow sequence
        ``i - 1``'s (``T = sum(q_i)``).
    pool : PagedKVPool
        The KV pool; the new tokens' keys/values must already be written.
    layer : int
        Layer index.
    block_tables : sequence of block tables
        One per sequence.
    num_new_tokens : sequence of int
        ``q_i`` per sequence (each ``>= 1``).
    context_lens : sequence of int
        Tokens stored per sequence, the new ones included; the new tokens are the last ``q_i``, causal.
    scaling : float
        Logit multiplier.
    plan : PackedPlan, optional
        The step's index tensors (:meth:`PackedPlan.build` of the same tables and lengths), shared by every
        layer; built here when None.

    Returns
    -------
    torch.Tensor
        ``[T, Hq, D]`` outputs in the query's dtype.

    Raises
    ------
    KVStackError
        On mismatched lengths, shapes or block tables too short.

    Notes
    -----
    With a float32 pool on the CPU and the fused kernels available (:func:`kvstack.cache.kernels.available`)
    every token attends in one call that reads the pool in place through the block tables
    (:func:`kvstack.cache.kernels.paged_attention_forward`); otherwise :func:`paged_attention` runs per
    sequence. Both compute exact softmax attention; they agree to float32 rounding.
    """
    total = sum(num_new_tokens)
    heads, dim = pool.num_kv_heads, pool.head_dim
    if query.dim() != 3 or query.shape[0] != total or query.shape[2] != dim or query.shape[1] % heads:
        raise KVStackError(
            f"query must be [T={total}, Hq, head_dim={dim}] with Hq a multiple of num_kv_heads={heads}, "
            f"got {tuple(query.shape)}"
        )
    if plan is None:
        plan = PackedPlan.build(pool, block_tables, num_new_tokens, context_lens)
    if not plan.use_kernel:
        per_sequence = list(torch.split(query.transpose(0, 1), list(num_new_tokens), dim=1))  # [Hq, q_i, D] each
        selected = {index: (table, reader) for _, index, table, _, reader in plan.selected}
        outputs = []
        for index, seq_query in enumerate(per_sequence):
            if index in selected and not selected[index][1].reads_every_page(layer):
                table, reader = selected[index]
                outputs.append(quest_decode_attention(seq_query, pool, layer, table, context_lens[index], reader,
                                                      scaling))
            else:
                outputs.extend(paged_attention([seq_query], pool, layer, [block_tables[index]], [context_lens[index]],
                                               scaling))
        return torch.cat(outputs, dim=1).transpose(0, 1)
    pool._check_layer(layer)
    return _kernel_path_attention(query, pool, layer, plan, scaling)


def _kernel_path_attention(
    query: torch.Tensor, pool: PagedKVPool, layer: int, plan: PackedPlan, scaling: float
) -> torch.Tensor:
    """``[T, Hq, D]`` attention of a packed step on the kernel path: the plan's kernel rows through the fused CPU
    kernel, its dense chunks through one SDPA each (:func:`_dense_chunk_attention`)."""
    if not plan.dense and not plan.selected:
        assert plan.tables is not None and plan.token_seq is not None and plan.token_pos is not None
        output = kernels.paged_attention_forward(
            query.float(), pool.kv, layer, plan.tables, plan.token_seq, plan.token_pos, float(scaling)
        )
        return output.to(query.dtype)
    output = torch.empty_like(query)
    if plan.tables is not None:
        assert plan.kernel_rows is not None and plan.token_seq is not None and plan.token_pos is not None
        output[plan.kernel_rows] = kernels.paged_attention_forward(
            query[plan.kernel_rows].float(), pool.kv, layer, plan.tables, plan.token_seq, plan.token_pos,
            float(scaling),
        ).to(query.dtype)
    for first, count, table, context_len in plan.dense:
        output[first : first + count] = _dense_chunk_attention(
            query[first : first + count], pool, layer, table, context_len, scaling
        )
    # Quest's decoding steps: selected together and read in place, except in a layer the reader keeps dense
    sparse = [entry for entry in plan.selected if not entry[4].reads_every_page(layer)]
    for row, _, table, context_len, reader in plan.selected:
        if reader.reads_every_page(layer):
            output[row : row + 1] = _dense_chunk_attention(query[row : row + 1], pool, layer, table, context_len,
                                                           scaling)
    if sparse:
        rows = [row for row, *_ in sparse]
        steps = [(table, context_len, reader) for _, _, table, context_len, reader in sparse]
        output[rows] = quest_decode_batch(query[rows], pool, layer, steps, scaling).to(query.dtype)
    return output


@dataclass
class PackedPlan:
    """Index tensors of one packed step, built once and used by every layer.

    On the kernel path (float32 pool on the CPU, kernels available) a sequence with fewer than
    :data:`DENSE_MIN_QUERIES` new tokens (decodes) goes to the fused kernel; a longer chunk (prefill) is
    attended with one ``scaled_dot_product_attention`` over its gathered blocks, where matrix products beat
    the kernel's per-query loops.

    Attributes
    ----------
    use_kernel : bool
        Whether the fused CPU kernel path runs.
    kernel_rows : torch.Tensor or None
        ``[Tk]`` int64 packed-token indices the kernel attends (None: every token, or none on the other path).
    tables : torch.Tensor or None
        ``[Sk, max_blocks]`` int64 block tables of the kernel's sequences, padded with block 0.
    token_seq, token_pos : torch.Tensor or None
        ``[Tk]`` int64: each kernel token's row of ``tables`` and its slot.
    dense : list of tuple
        ``(first_row, count, block_table, context_len)`` of each chunk attended densely.
    selected : list of tuple
        ``(row, sequence_index, block_table, context_len, page_reader)`` of each decoding step that reads only the
        blocks its page-reading policy selects (:func:`~kvstack.engine.quest_attention.quest_decode_attention`),
        on either path.
    write_blocks, write_slots : torch.Tensor
        ``[T]`` int64: the block and slot each packed token's new keys/values are written to.
    """

    use_kernel: bool
    kernel_rows: torch.Tensor | None
    tables: torch.Tensor | None
    token_seq: torch.Tensor | None
    token_pos: torch.Tensor | None
    dense: list[tuple[int, int, list[int], int]]
    write_blocks: torch.Tensor
    write_slots: torch.Tensor
    selected: list[tuple[int, int, list[int], int, Method]]

    @classmethod
    def build(
        cls, pool: PagedKVPool, block_tables: Sequence[BlockTable], num_new_tokens: Sequence[int],
        context_lens: Sequence[int], page_readers: Sequence[Method | None] | None = None,
    ) -> PackedPlan:
        """Check the step's tables and lengths once and build its index tensors.

        ``page_readers`` (one per sequence, None for most) names the sequences whose decoding steps read only
        the blocks a page-reading policy selects; a step whose budget covers every block takes the ordinary path.

        Raises
        ------
        KVStackError
            On mismatched lengths, a sequence with no new token or a block table too short.
        """
        batch = len(num_new_tokens)
        if len(block_tables) != batch or len(context_lens) != batch:
            raise KVStackError(
                f"block_tables, num_new_tokens and context_lens must have one entry per sequence, got "
                f"{len(block_tables)}, {batch} and {len(context_lens)}"
            )
        use_kernel = (isinstance(pool, PagedKVPool) and pool.device.type == "cpu" and pool.dtype == torch.float32
                      and pool.kv.is_contiguous() and kernels.available())
        kernel_tables: list[list[int]] = []
        kernel_rows: list[int] = []
        token_seq: list[int] = []
        token_pos: list[int] = []
        dense: list[tuple[int, int, list[int], int]] = []
        selected: list[tuple[int, int, list[int], int, Method]] = []
        readers = list(page_readers) if page_readers is not None else [None] * batch
        blocks: list[int] = []
        slots: list[int] = []
        size = pool.block_size
        row = 0
        for index, (table, new, context_len) in enumerate(zip(block_tables, num_new_tokens, context_lens,
                                                              strict=True)):
            if isinstance(new, bool) or not isinstance(new, int) or new < 1 or not isinstance(context_len, int) or (
                context_len < new
            ):
                raise KVStackError(
                    f"sequence {index} needs num_new_tokens >= 1 and context_lens >= num_new_tokens, got {new!r} "
                    f"and {context_len!r}"
                )
            entries = table_to_list(table, -(-context_len // size), pool.num_blocks,
                                     f"attending over {context_len} tokens of sequence {index}")
            positions = range(context_len - new, context_len)
            blocks.extend(entries[p // size] for p in positions)
            slots.extend(positions)
            reader = readers[index]
            full, read = quest_blocks_read(reader, context_len, size) if reader is not None else (0, 0)
            if reader is not None and new == 1 and read < full:
                selected.append((row, index, entries, context_len, reader))
            elif new >= DENSE_MIN_QUERIES:
                dense.append((row, new, entries, context_len))
            else:
                token_seq.extend([len(kernel_tables)] * new)
                kernel_tables.append(entries)
                kernel_rows.extend(range(row, row + new))
                token_pos.extend(positions)
            row += new
        table_tensor = seq_tensor = pos_tensor = rows_tensor = None
        if use_kernel and kernel_tables:
            width = max(len(table) for table in kernel_tables)
            table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in kernel_tables], dtype=torch.long)
            seq_tensor = torch.tensor(token_seq, dtype=torch.long)
            pos_tensor = torch.tensor(token_pos, dtype=torch.long)
            if dense or selected:
                rows_tensor = torch.tensor(kernel_rows, dtype=torch.long)
        slot_tensor = torch.tensor(slots, dtype=torch.long, device=pool.device)
        return cls(use_kernel, rows_tensor, table_tensor, seq_tensor, pos_tensor, dense if use_kernel else [],
                   torch.tensor(blocks, dtype=torch.long, device=pool.device), slot_tensor % size, selected)


DENSE_MIN_QUERIES = 8
"""Chunks with at least this many new tokens are attended with a matrix-product SDPA, not the kernel."""


def _dense_chunk_attention(
    query: torch.Tensor, pool: PagedKVPool, layer: int, table: list[int], context_len: int, scaling: float
) -> torch.Tensor:
    """``[q, Hq, D]`` attention of one chunk's ``query`` ``[q, Hq, D]`` (the last ``q`` slots) over its blocks."""
    keys, values = pool.gather(layer, table, context_len)  # [H, L, D]
    return chunk_attention(query, keys, values, scaling)


def chunk_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[q, Hq, D]`` causal attention of a chunk's ``query`` ``[q, Hq, D]``, the last ``q`` of the ``L`` slots of
    ``keys`` and ``values`` ``[H, L, D]`` (query ``j`` sees slots ``0 .. L - q + j``)."""
    context_len = keys.shape[1]
    count, num_q_heads, _ = query.shape
    heads_query = query.transpose(0, 1)[None].to(keys.dtype)  # [1, Hq, q, D]
    gqa = num_q_heads != keys.shape[0]
    if count == context_len:
        out = F.scaled_dot_product_attention(heads_query, keys[None], values[None], is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
    else:
        allowed = torch.arange(context_len)[None, :] <= (context_len - count + torch.arange(count))[:, None]
        out = F.scaled_dot_product_attention(heads_query, keys[None], values[None], attn_mask=allowed, scale=scaling,
                                             enable_gqa=gqa)
    return out[0].transpose(0, 1).to(query.dtype)  # [q, Hq, D]
