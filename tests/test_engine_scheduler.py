"""Iteration-level scheduler: continuous batching, chunked prefill, FCFS/LPM admission, preemption by recompute.

The expectations are independent of the scheduler's internals: a fake model makes each sampled token a
function of (request id, position) only, so every request's output is known in advance and must not depend
on batching, chunking, prefix hits or preemption; the workload properties check budgets, the running cap,
the block manager's invariants and that no request is lost or duplicated.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstack.engine import (
    BlockManager,
    FinishReason,
    Request,
    ScheduledBatch,
    Scheduler,
    SequenceStatus,
)
from kvstack.errors import KVStackError

BLOCK_SIZE = 4


def fake_token(request_id: int, position: int) -> int:
    """The fake model's next token: depends only on the request and the token's position (never < 10)."""
    return (request_id * 7919 + position * 104729) % 1000 + 10


def expected_output(request: Request) -> list[int]:
    prompt_len = len(request.prompt_token_ids)
    return [fake_token(request.request_id, prompt_len + i) for i in range(request.max_new_tokens)]


def model_outputs(scheduler: Scheduler, batch: ScheduledBatch) -> dict[int, int | None]:
    """Play the model for one batch: a token for each chunk that completes its sequence's tokens."""
    outputs: dict[int, int | None] = {}
    for entry in batch.scheduled:
        seq = scheduler.get_sequence(entry.request_id)
        assert entry.num_tokens >= 1
        assert seq.num_computed_tokens + entry.num_tokens <= seq.num_tokens
        if seq.num_computed_tokens + entry.num_tokens == seq.num_tokens:
            outputs[entry.request_id] = fake_token(entry.request_id, seq.num_tokens)
        else:
            outputs[entry.request_id] = None
    return outputs


def drive(
    scheduler: Scheduler,
    arrivals: dict[int, list[Request]] | None = None,
    *,
    max_steps: int = 3000,
    check: Callable[[ScheduledBatch], None] | None = None,
) -> list[ScheduledBatch]:
    """Run schedule()/update() until everything finished; requests in ``arrivals[k]`` are added before step k."""
    pending = {step: list(reqs) for step, reqs in (arrivals or {}).items()}
    batches: list[ScheduledBatch] = []
    step = 0
    while pending or scheduler.has_unfinished():
        for request in pending.pop(step, []):
            scheduler.add_request(request)
        batch = scheduler.schedule()
        scheduler.update(model_outputs(scheduler, batch))
        batches.append(batch)
        if check is not None:
            check(batch)
        step += 1
        assert step < max_steps, f"no progress after {max_steps} steps: {scheduler.metrics()}"
    return batches


def make_request(request_id: int, prompt: list[int], max_new_tokens: int, arrival: float = 0.0) -> Request:
    return Request(request_id, prompt, max_new_tokens, arrival)


def first_scheduled_order(batches: list[ScheduledBatch]) -> list[int]:
    """Request ids in the order they were first scheduled (batch order within a step)."""
    order: list[int] = []
    for batch in batches:
        order.extend(rid for rid in batch.request_ids() if rid not in order)
    return order


# --------------------------------------------------------------------------------------------------
# Random workloads
# --------------------------------------------------------------------------------------------------

SHARED_PREFIXES = ((), tuple(range(100, 108)), tuple(range(200, 206)), (100, 101, 102, 103, 9, 9, 9, 9, 9))


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    num_blocks = draw(st.integers(4, 10))  # small pools, so that sequences get preempted
    capacity = num_blocks * BLOCK_SIZE
    requests = []
    for rid in range(draw(st.integers(2, 8))):
        prefix = draw(st.sampled_from(SHARED_PREFIXES))
        tail = draw(st.lists(st.integers(0, 50), min_size=0 if prefix else 1, max_size=10))
        prompt = (list(prefix) + tail)[: capacity - 1]
        max_new = min(draw(st.integers(1, 14)), capacity - len(prompt))  # must fit in the whole pool
        arrival_step = draw(st.integers(0, 8))
        requests.append((rid, prompt, max_new, arrival_step))
    return {
        "requests": requests,
        "num_blocks": num_blocks,
        "budget": draw(st.integers(1, 24)),
        "max_num_seqs": draw(st.integers(1, 6)),
        "max_waiting_steps": draw(st.sampled_from([None, 1, 3])),
        "caching": draw(st.sampled_from([True, True, False])),
    }


def run_alone(request: Request) -> list[int]:
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), max_num_batched_tokens=7)
    drive(scheduler, {0: [request]})
    (seq,) = scheduler.finished()
    return seq.output_token_ids


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
@settings(deadline=None, derandomize=True, max_examples=40)
@given(workload=workloads())
def test_random_workloads_finish_exactly_and_match_solo_runs(policy: str, workload: dict) -> None:
    manager = BlockManager(workload["num_blocks"], BLOCK_SIZE, enable_prefix_caching=workload["caching"])
    scheduler = Scheduler(
        manager,
        max_num_batched_tokens=workload["budget"],
        max_num_seqs=workload["max_num_seqs"],
        policy=policy,
        max_waiting_steps=workload["max_waiting_steps"],
    )
    requests = {}
    arrivals: dict[int, list[Request]] = {}
    for rid, prompt, max_new, arrival_step in workload["requests"]:
        request = make_request(rid, prompt, max_new, arrival=float(arrival_step))
        requests[rid] = request
        arrivals.setdefault(arrival_step, []).append(request)

    def check(batch: ScheduledBatch) -> None:
        assert batch.num_batched_tokens == sum(entry.num_tokens for entry in batch.scheduled)
        assert batch.num_batched_tokens <= workload["budget"]
        assert len(batch.scheduled) <= workload["max_num_seqs"]
        assert scheduler.num_running <= workload["max_num_seqs"]
        assert len(set(batch.request_ids())) == len(batch.scheduled)
        assert not set(batch.preempted) & set(batch.request_ids())
        for rid in batch.preempted:
            assert scheduler.get_sequence(rid).status is SequenceStatus.WAITING
        manager.check_invariants()
        assert sorted(manager.seq_ids()) == sorted(scheduler.running_request_ids())

    drive(scheduler, arrivals, check=check)

    finished = scheduler.finished()
    assert sorted(seq.request_id for seq in finished) == sorted(requests)  # none lost, none duplicated
    for seq in finished:
        request = requests[seq.request_id]
        assert seq.finish_reason is FinishReason.LENGTH
        assert len(seq.output_token_ids) == request.max_new_tokens
        assert seq.output_token_ids == expected_output(request)
        assert seq.token_ids == request.prompt_token_ids + seq.output_token_ids
        assert seq.output_token_ids == run_alone(request)
    manager.check_invariants()
    assert manager.pool.num_used == 0
    assert manager.pool.num_free + manager.pool.num_cached == manager.pool.num_blocks
    assert manager.seq_ids() == []
    assert scheduler.metrics()["preemptions"] == sum(seq.num_preemptions for seq in finished)


def test_small_pool_workload_preempts_and_still_matches() -> None:
    manager = BlockManager(6, BLOCK_SIZE)
    scheduler = Scheduler(manager, max_num_batched_tokens=16, max_num_seqs=4)
    requests = [make_request(rid, [rid * 10 + k for k in range(5)], 12, arrival=float(rid)) for rid in range(4)]
    drive(scheduler, {0: requests}, check=lambda batch: manager.check_invariants())
    assert scheduler.metrics()["preemptions"] > 0
    by_id = {seq.request_id: seq for seq in scheduler.finished()}
    for request in requests:
        assert by_id[request.request_id].output_token_ids == expected_output(request)
    assert manager.pool.num_used == 0


# --------------------------------------------------------------------------------------------------
# Admission policies
# --------------------------------------------------------------------------------------------------


def test_fcfs_admits_in_arrival_order() -> None:
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), max_num_batched_tokens=6, max_num_seqs=2)
    arrival_times = {0: 3.0, 1: 1.0, 2: 4.0, 3: 2.0, 4: 0.5}
    for rid, arrival in arrival_times.items():  # added out of arrival order
        scheduler.add_request(make_request(rid, [rid, 1, 2, 3, 4], 3, arrival=arrival))
    assert scheduler.waiting_request_ids() == [4, 1, 3, 0, 2]
    batches = drive(scheduler)
    assert first_scheduled_order(batches) == [4, 1, 3, 0, 2]
    steps = [scheduler.get_sequence(rid).first_scheduled_step for rid in [4, 1, 3, 0, 2]]
    assert steps == sorted(steps)


def test_fcfs_head_that_does_not_fit_blocks_smaller_later_requests() -> None:
    manager = BlockManager(8, BLOCK_SIZE)
    scheduler = Scheduler(manager, max_num_batched_tokens=64)
    scheduler.add_request(make_request(0, list(range(20)), 8))  # 5 blocks, runs first
    scheduler.add_request(make_request(1, list(range(50, 70)), 8))  # 5 blocks: does not fit next to 0
    scheduler.add_request(make_request(2, [7], 1))  # 1 block: would fit, but must not skip ahead
    batch = scheduler.schedule()
    assert batch.request_ids() == [0]
    assert scheduler.waiting_request_ids() == [1, 2]
    scheduler.update(model_outputs(scheduler, batch))
    assert first_scheduled_order([batch, *drive(scheduler)]) == [0, 1, 2]


def test_lpm_admits_the_request_sharing_a_warm_prefix_first() -> None:
    manager = BlockManager(64, BLOCK_SIZE)
    warm_prefix = list(range(100, 112))  # 3 full blocks
    scheduler = Scheduler(manager, max_num_batched_tokens=64, max_num_seqs=1, policy="lpm")
    drive(scheduler, {0: [make_request(0, [*warm_prefix, 1], 1)]})  # warms the cache, then finishes
    scheduler.add_request(make_request(1, [5, 6, 7, 8, 9], 2, arrival=1.0))  # earlier, shares nothing
    scheduler.add_request(make_request(2, [*warm_prefix, 2, 3], 2, arrival=2.0))
    assert manager.cached_prefix_tokens([*warm_prefix, 2, 3]) == 12
    batch = scheduler.schedule()
    assert batch.request_ids() == [2]
    assert scheduler.get_sequence(2).num_computed_tokens == 12  # the warm prefix is not recomputed
    assert batch.scheduled[0].num_tokens == 2
    scheduler.update(model_outputs(scheduler, batch))
    assert first_scheduled_order([batch, *drive(scheduler)]) == [2, 1]

    fcfs = Scheduler(BlockManager(64, BLOCK_SIZE), max_num_batched_tokens=64, max_num_seqs=1, policy="fcfs")
    drive(fcfs, {0: [make_request(0, [*warm_prefix, 1], 1)]})
    fcfs.add_request(make_request(1, [5, 6, 7, 8, 9], 2, arrival=1.0))
    fcfs.add_request(make_request(2, [*warm_prefix, 2, 3], 2, arrival=2.0))
    assert fcfs.schedule().request_ids() == [1]


def test_lpm_aging_admits_a_non_sharing_request_within_max_waiting_steps() -> None:
    max_waiting = 5
    manager = BlockManager(64, BLOCK_SIZE)
    scheduler = Scheduler(
        manager, max_num_batched_tokens=64, max_num_seqs=1, policy="lpm", max_waiting_steps=max_waiting
    )
    warm_prefix = list(range(100, 112))
    next_id = 0

    def add_sharing(arrival: float) -> None:
        nonlocal next_id
        scheduler.add_request(make_request(next_id, [*warm_prefix, next_id], 2, arrival=arrival))
        next_id += 1

    add_sharing(0.0)
    add_sharing(0.0)
    loner_id = 10_000
    scheduler.add_request(make_request(loner_id, [1, 2, 3, 4, 5], 2, arrival=0.5))
    added_at = scheduler.num_steps
    for step in range(200):
        add_sharing(1.0 + step)  # a steady stream that always has a better prefix match than the loner
        batch = scheduler.schedule()
        scheduler.update(model_outputs(scheduler, batch))
        if scheduler.get_sequence(loner_id).first_scheduled_step is not None:
            break
    admitted_at = scheduler.get_sequence(loner_id).first_scheduled_step
    assert admitted_at is not None
    assert admitted_at - added_at <= max_waiting + 3
    assert admitted_at - added_at > 2  # it was indeed passed over first: the stream is preferred without aging


# --------------------------------------------------------------------------------------------------
# Chunked prefill, preemption, uncomputed prefix blocks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt_len", "budget"), [(10, 4), (12, 4), (13, 5), (3, 8), (1, 1)])
def test_chunked_prefill_takes_ceil_len_over_budget_steps(prompt_len: int, budget: int) -> None:
    scheduler = Scheduler(BlockManager(32, BLOCK_SIZE), max_num_batched_tokens=budget)
    scheduler.add_request(make_request(7, list(range(prompt_len)), 2))
    chunks = []
    while not scheduler.get_sequence(7).output_token_ids:
        batch = scheduler.schedule()
        (entry,) = batch.scheduled
        assert entry.is_prefill
        chunks.append(entry.num_tokens)
        scheduler.update(model_outputs(scheduler, batch))
    assert len(chunks) == math.ceil(prompt_len / budget)
    assert sum(chunks) == prompt_len
    assert all(chunk == budget for chunk in chunks[:-1])
    batch = scheduler.schedule()
    assert [(e.num_tokens, e.is_prefill) for e in batch.scheduled] == [(1, False)]


def test_decodes_come_before_prefill_chunks() -> None:
    scheduler = Scheduler(BlockManager(32, BLOCK_SIZE), max_num_batched_tokens=4)
    scheduler.add_request(make_request(0, [1, 2], 5, arrival=0.0))
    scheduler.add_request(make_request(1, list(range(20, 30)), 2, arrival=1.0))
    batch = scheduler.schedule()  # 0 prefills (2 tokens), 1 starts its prefill with the rest
    assert [(e.request_id, e.num_tokens) for e in batch.scheduled] == [(0, 2), (1, 2)]
    scheduler.update(model_outputs(scheduler, batch))
    batch = scheduler.schedule()
    assert [(e.request_id, e.num_tokens, e.is_prefill) for e in batch.scheduled] == [(0, 1, False), (1, 3, True)]


def test_preemption_picks_the_youngest_and_requeues_it_at_the_front() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    scheduler = Scheduler(manager, max_num_batched_tokens=64)
    for rid in range(4):  # 3-token prompts: one block each, the whole pool
        scheduler.add_request(make_request(rid, [rid, 20, 21], 5, arrival=float(rid)))
    batch = scheduler.schedule()
    assert batch.request_ids() == [0, 1, 2, 3]
    assert batch.preempted == ()
    scheduler.update(model_outputs(scheduler, batch))
    scheduler.add_request(make_request(4, [15], 1, arrival=4.0))
    batch = scheduler.schedule()
    # Every sequence now holds a full block and needs a new one for its next token; none is free:
    # 0 gets the block of the youngest (3), 1 the block of the next youngest (2).
    assert batch.preempted == (3, 2)
    assert batch.request_ids() == [0, 1]
    assert scheduler.waiting_request_ids() == [2, 3, 4]
    for rid in (2, 3):
        seq = scheduler.get_sequence(rid)
        assert seq.status is SequenceStatus.WAITING
        assert seq.num_computed_tokens == 0
        assert seq.num_preemptions == 1
        assert len(seq.output_token_ids) == 1  # kept, to be recomputed
        assert rid not in manager
    assert scheduler.metrics()["preemptions"] == 2
    scheduler.update(model_outputs(scheduler, batch))
    later = drive(scheduler)
    assert [rid for rid in first_scheduled_order(later) if rid in (2, 3, 4)] == [2, 3, 4]
    by_id = {seq.request_id: seq for seq in scheduler.finished()}
    assert sorted(by_id) == [0, 1, 2, 3, 4]
    for rid, seq in by_id.items():
        assert seq.output_token_ids == expected_output(seq.request), rid
    assert by_id[0].num_preemptions == by_id[1].num_preemptions == 0


def test_the_asking_sequence_is_preempted_when_it_is_the_youngest() -> None:
    manager = BlockManager(3, BLOCK_SIZE)
    scheduler = Scheduler(manager, max_num_batched_tokens=64)
    scheduler.add_request(make_request(0, [1, 2, 3], 6, arrival=0.0))
    scheduler.add_request(make_request(1, [4, 5, 6], 6, arrival=1.0))
    batch = scheduler.schedule()
    scheduler.update(model_outputs(scheduler, batch))
    preempted_ids: list[int] = []
    for _ in range(40):
        batch = scheduler.schedule()
        preempted_ids.extend(batch.preempted)
        scheduler.update(model_outputs(scheduler, batch))
        if not scheduler.has_unfinished():
            break
    assert preempted_ids and set(preempted_ids) == {1}  # the older request is never the victim
    assert all(seq.output_token_ids == expected_output(seq.request) for seq in scheduler.finished())


def test_prefix_hit_on_blocks_whose_kv_was_never_computed_is_recomputed() -> None:
    manager = BlockManager(16, BLOCK_SIZE)
    scheduler = Scheduler(manager, max_num_batched_tokens=4)
    scheduler.add_request(make_request(0, list(range(16)), 2))
    batch = scheduler.schedule()  # computes block 0 only
    scheduler.update(model_outputs(scheduler, batch))
    assert scheduler.abort(0)  # blocks 1-3 were registered at allocation but never computed
    scheduler.add_request(make_request(1, [*range(12), 99], 2))
    assert manager.cached_prefix_tokens([*range(12), 99]) == 12
    batch = scheduler.schedule()
    assert scheduler.get_sequence(1).num_computed_tokens == 4  # trusts block 0 only
    assert batch.scheduled[0].num_tokens == 4


def test_prefix_hit_computed_earlier_in_the_same_batch_is_reused() -> None:
    manager = BlockManager(16, BLOCK_SIZE)
    scheduler = Scheduler(manager, max_num_batched_tokens=64)
    scheduler.add_request(make_request(0, list(range(12)), 2))
    scheduler.add_request(make_request(1, [*range(8), 50, 51], 2))
    batch = scheduler.schedule()
    assert [(e.request_id, e.num_tokens) for e in batch.scheduled] == [(0, 12), (1, 2)]
    assert scheduler.get_sequence(1).num_computed_tokens == 8


def test_eos_finishes_early_and_frees_blocks() -> None:
    manager = BlockManager(16, BLOCK_SIZE)
    scheduler = Scheduler(manager)
    eos = fake_token(0, 5 + 2)  # the third generated token
    scheduler.add_request(Request(0, [1, 2, 3, 4, 5], 10, 0.0, eos_token_ids=frozenset({eos})))
    drive(scheduler)
    (seq,) = scheduler.finished()
    assert seq.finish_reason is FinishReason.EOS
    assert seq.output_token_ids == [fake_token(0, 5), fake_token(0, 6), eos]
    assert manager.pool.num_used == 0


def test_abort_waiting_running_and_in_flight_requests() -> None:
    manager = BlockManager(16, BLOCK_SIZE)
    scheduler = Scheduler(manager, max_num_batched_tokens=64, max_num_seqs=2)
    for rid in range(4):
        scheduler.add_request(make_request(rid, [rid, 1, 2, 3, 4], 3, arrival=float(rid)))
    batch = scheduler.schedule()
    assert batch.request_ids() == [0, 1]
    assert scheduler.abort(3)  # waiting
    assert scheduler.abort(1)  # in the batch being run: finished at update()
    assert 1 in manager
    scheduler.update(model_outputs(scheduler, batch))
    assert 1 not in manager
    assert scheduler.abort(0)  # running, not in flight
    assert 0 not in manager
    assert not scheduler.abort(0)  # already finished
    drive(scheduler)
    reasons = {seq.request_id: seq.finish_reason for seq in scheduler.finished()}
    assert reasons == {
        0: FinishReason.ABORTED,
        1: FinishReason.ABORTED,
        2: FinishReason.LENGTH,
        3: FinishReason.ABORTED,
    }
    manager.check_invariants()
    assert manager.pool.num_used == 0


def test_finished_clear_forgets_ids() -> None:
    scheduler = Scheduler(BlockManager(16, BLOCK_SIZE))
    drive(scheduler, {0: [make_request(0, [1, 2], 2)]})
    assert [seq.request_id for seq in scheduler.finished(clear=True)] == [0]
    assert scheduler.finished() == []
    drive(scheduler, {0: [make_request(0, [1, 2], 2)]})  # the id is reusable
    assert scheduler.metrics()["num_finished"] == 1


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _one_line_error(excinfo: pytest.ExceptionInfo[KVStackError], *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_unknown_policy() -> None:
    with pytest.raises(KVStackError) as excinfo:
        Scheduler(BlockManager(8, BLOCK_SIZE), policy="sjf")
    _one_line_error(excinfo, "sjf", "fcfs", "lpm")
    with pytest.raises(KVStackError):
        Scheduler(BlockManager(8, BLOCK_SIZE), max_num_batched_tokens=0)
    with pytest.raises(KVStackError):
        Scheduler(BlockManager(8, BLOCK_SIZE), max_waiting_steps=0)


def test_bad_requests() -> None:
    with pytest.raises(KVStackError) as excinfo:
        Request(0, [], 4, 0.0)
    _one_line_error(excinfo, "empty")
    with pytest.raises(KVStackError) as excinfo:
        Request(0, [1, 2], 0, 0.0)
    _one_line_error(excinfo, "max_new_tokens", ">= 1")
    with pytest.raises(KVStackError):
        Request(0, [1, "a"], 2, 0.0)  # type: ignore[list-item]


def test_bad_requests_leave_others_undisturbed() -> None:
    manager = BlockManager(8, BLOCK_SIZE)
    scheduler = Scheduler(manager, max_num_batched_tokens=3)
    good = [make_request(rid, [rid, 5, 6, 7, 8], 3, arrival=float(rid)) for rid in range(2)]
    for request in good:
        scheduler.add_request(request)
    batch = scheduler.schedule()
    scheduler.update(model_outputs(scheduler, batch))
    snapshot = (scheduler.waiting_request_ids(), scheduler.running_request_ids(), manager.metrics())

    with pytest.raises(KVStackError) as excinfo:
        scheduler.add_request(make_request(0, [1], 1))
    _one_line_error(excinfo, "already exists")
    with pytest.raises(KVStackError) as excinfo:
        scheduler.add_request(make_request(9, list(range(31)), 3))  # 33 stored tokens (not the last): 9 > 8
    _one_line_error(excinfo, "never fit", "9 KV blocks", "8")
    with pytest.raises(KVStackError) as excinfo:
        scheduler.abort(42)
    _one_line_error(excinfo, "unknown request 42")
    with pytest.raises(KVStackError) as excinfo:
        scheduler.update({0: 5})  # nothing is pending
    _one_line_error(excinfo, "no batch is pending")

    assert (scheduler.waiting_request_ids(), scheduler.running_request_ids(), manager.metrics()) == snapshot
    drive(scheduler)
    by_id = {seq.request_id: seq for seq in scheduler.finished()}
    assert sorted(by_id) == [0, 1]
    for request in good:
        assert by_id[request.request_id].output_token_ids == expected_output(request)


def test_update_protocol_errors_change_nothing() -> None:
    scheduler = Scheduler(BlockManager(16, BLOCK_SIZE), max_num_batched_tokens=4)
    scheduler.add_request(make_request(0, list(range(6)), 2))
    batch = scheduler.schedule()  # a 4-token chunk of a 6-token prompt: no token yet
    with pytest.raises(KVStackError) as excinfo:
        scheduler.schedule()
    _one_line_error(excinfo, "update()")
    with pytest.raises(KVStackError) as excinfo:
        scheduler.update({0: 123})
    _one_line_error(excinfo, "must be None")
    with pytest.raises(KVStackError) as excinfo:
        scheduler.update({5: None})
    _one_line_error(excinfo, "did not schedule")
    assert scheduler.get_sequence(0).num_computed_tokens == 0
    scheduler.update({0: None})
    batch = scheduler.schedule()  # completes the prompt: a token is required
    with pytest.raises(KVStackError) as excinfo:
        scheduler.update({})
    _one_line_error(excinfo, "sampled token")
    scheduler.update(model_outputs(scheduler, batch))
    assert scheduler.get_sequence(0).output_token_ids == [fake_token(0, 6)]


def test_cached_prefix_tokens_is_read_only_and_matches_allocate_prompt() -> None:
    manager = BlockManager(8, BLOCK_SIZE, namespace="m")
    manager.allocate_prompt("a", list(range(10)))
    manager.free("a")
    prompt = [*range(8), 77]
    before = (manager.metrics(), manager.pool.cached_blocks_lru(), manager.seq_ids())
    assert manager.cached_prefix_tokens(prompt) == 8
    assert manager.cached_prefix_tokens(list(range(8))) == 4  # the block holding the last token is never a hit
    assert manager.cached_prefix_tokens([]) == 0
    assert (manager.metrics(), manager.pool.cached_blocks_lru(), manager.seq_ids()) == before
    assert manager.allocate_prompt("b", prompt) == 8
    assert BlockManager(8, BLOCK_SIZE, enable_prefix_caching=False).cached_prefix_tokens(prompt) == 0


def test_forks_of_n_samples_share_the_prompt_and_are_dropped_when_the_parent_is_aborted_mid_step() -> None:
    def forked(abort_mid_step: bool) -> tuple[Scheduler, BlockManager]:
        manager = BlockManager(num_blocks=16, block_size=4)
        scheduler = Scheduler(manager, max_num_batched_tokens=32)
        scheduler.add_request(Request(0, [1, 2, 3, 4, 5, 6], 4, 0.0, n=3))
        scheduler.schedule()
        if abort_mid_step:
            assert scheduler.abort(0)
        scheduler.update({0: 7}, {0: [("a", 8), ("b", 9)]})
        return scheduler, manager

    scheduler, manager = forked(abort_mid_step=False)
    assert scheduler.running_request_ids() == [0, "a", "b"]
    assert [scheduler.get_sequence(r).output_token_ids for r in (0, "a", "b")] == [[7], [8], [9]]
    tables = [manager.block_table(r) for r in (0, "a", "b")]
    assert tables[0][0] == tables[1][0] == tables[2][0]  # the full prompt block is shared
    assert len({t[1] for t in tables}) == 3  # each sample writes its own last block (copy-on-write)
    manager.check_invariants()

    scheduler, manager = forked(abort_mid_step=True)
    assert scheduler.get_sequence(0).finish_reason.value == "aborted"
    assert not scheduler.has_unfinished() and manager.pool.num_used == 0
    with pytest.raises(KVStackError, match="unknown"):
        scheduler.get_sequence("a")
