"""The engine's own thread: the one thread that ever calls the :class:`~kvstack.engine.Engine`.

The engine is not thread-safe, and a step (one packed forward) takes milliseconds to seconds, so it cannot run
on the asyncio event loop either. :class:`EngineLoop` owns a background thread that, at the top of each
iteration, drains the submissions and aborts queued by coroutines (under one :class:`threading.Condition`),
then calls ``engine.step()`` and hands every :class:`~kvstack.engine.RequestOutput` to the asyncio queue of the
request that owns it with ``loop.call_soon_threadsafe``. With nothing to do it sleeps on the condition: no
busy wait.

Guarantees a submitter can build on:

- a submission is either rejected (its ``accepted`` future raises the engine's :class:`KVStackError`) or
  accepted (the future gives the engine's request id);
- every sample of an accepted request then gets exactly one :class:`SampleEvent` with ``finished=True``:
  its own end (``"length"``, ``"eos"``, ``"stop"``), an ``"error"`` (the step failed for it, or the engine
  raised), or ``"aborted"`` (aborted by :meth:`RequestHandle.abort`, or the loop stopped);
- :meth:`RequestHandle.abort` frees the request's KV blocks at the engine's next iteration, whatever state it
  is in; a request whose samples all finished needs no abort;
- once every sample of a request finished, the engine forgets it (:meth:`Engine.release`): a server's memory
  does not grow with the requests it served.

The thread also publishes ``engine.metrics()`` after each iteration (:meth:`EngineLoop.snapshot`), so that
``/metrics`` never reads the engine from the event loop while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Hashable, Sequence
from typing import Any

from kvstack.engine import Engine, RequestOutput, SamplingParams
from kvstack.errors import KVStackError

__all__ = ["EngineLoop", "EngineLoopStoppedError", "QueueFullError", "RequestHandle", "SampleEvent", "Submission"]

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 1.0  # longest pause after consecutive engine.step() failures, so a broken engine cannot spin


class EngineLoopStoppedError(KVStackError):
    """The engine loop is not running (not started yet, stopping, or stopped)."""


class QueueFullError(KVStackError):
    """More requests would be in flight than the loop was asked to allow."""


@dataclasses.dataclass(frozen=True)
class Submission:
    """One engine request to queue: the arguments of :meth:`Engine.add_request`."""

    prompt_token_ids: Sequence[int]
    params: SamplingParams
    method: str | None = None


@dataclasses.dataclass(frozen=True)
class SampleEvent:
    """What the engine produced for one sample of a submitted request.

    Attributes
    ----------
    tag : int
        Position of the request in the :meth:`EngineLoop.submit` call that queued it.
    sample_index : int
        Which sample (0 to ``n - 1``; the request itself is sample 0, its forked children follow in fork order).
    token_ids : tuple of int
        New tokens.
    finished : bool
        Whether the sample is finished; it then gets no further event.
    finish_reason : str or None
        The engine's reason once finished: ``"length"``, ``"eos"``, ``"stop"``, ``"aborted"`` or ``"error"``.
    error : str or None
        What went wrong, with ``finish_reason`` ``"error"`` (or ``"aborted"`` when the loop stopped).
    """

    tag: int
    sample_index: int
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None


class RequestHandle:
    """One request queued on an :class:`EngineLoop`, as its submitter sees it.

    Attributes
    ----------
    tag : int
        The request's position in its :meth:`EngineLoop.submit` call.
    accepted : asyncio.Future
        Resolves with the engine's request id, or raises the :class:`KVStackError` that ``add_request``
        raised (invalid prompt or parameters).
    events : asyncio.Queue
        Where its :class:`SampleEvent` objects arrive (shared by every request of one :meth:`EngineLoop.submit`).
    """

    def __init__(self, owner: EngineLoop, submission: Submission, tag: int, events: asyncio.Queue[Any],
                 event_loop: asyncio.AbstractEventLoop) -> None:
        self.tag = tag
        self.submission = submission
        self.events = events
        self.event_loop = event_loop
        self.accepted: asyncio.Future[Hashable] = event_loop.create_future()
        self._owner = owner
        self._abort_requested = False  # written by the submitter, read by the engine thread under the lock

    def abort(self) -> None:
        """Abort the request (or drop it before it reaches the engine); thread-safe and idempotent.

        Its KV blocks are freed at the engine loop's next iteration, and each unfinished sample then reports
        ``finished`` with reason ``"aborted"``.
        """
        self._owner._abort(self)


@dataclasses.dataclass(eq=False)
class _Family:
    """Engine-thread state of one accepted request and its parallel samples (``n > 1``)."""

    handle: RequestHandle
    request_id: Hashable
    n: int
    sample_of: dict[Hashable, int] = dataclasses.field(default_factory=dict)  # engine id -> sample index
    finished: dict[Hashable, str] = dataclasses.field(default_factory=dict)  # engine id -> finish reason
    errors: dict[Hashable, str] = dataclasses.field(default_factory=dict)
    reported: set[int] = dataclasses.field(default_factory=set)  # sample indexes that got their finished event


class EngineLoop:
    """Run an :class:`~kvstack.engine.Engine` in a background thread and serve it to asyncio code.

    Parameters
    ----------
    engine : Engine
        The engine; from :meth:`start` on, only the loop's thread may call it. The loop never closes it
        (``engine.close()`` is the owner's, once :meth:`stop` returned).

    Examples
    --------
    Inside a coroutine::

        events = asyncio.Queue()
        [handle] = loop.submit([Submission(prompt, SamplingParams(max_new_tokens=8))], events)
        await handle.accepted
        while not (event := await events.get()).finished:
            ...
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._submissions: list[RequestHandle] = []
        self._aborts: list[RequestHandle] = []
        self._stop_requested = False
        self._accepting = False
        self._in_flight = 0  # submitted and not yet over: guarded by _cond
        self._thread: threading.Thread | None = None
        # engine-thread state
        self._families: dict[Hashable, _Family] = {}
        self._family_of_handle: dict[RequestHandle, _Family] = {}
        self._family_of_sample: dict[Hashable, _Family] = {}  # engine id of every sample -> its family
        self._failures_in_a_row = 0
        self._snapshot: dict[str, float | int] | None = None
        self._outbox: list[tuple[RequestHandle, SampleEvent]] = []

    # ------------------------------------------------------------------ lifecycle (any thread)
    def start(self) -> None:
        """Start the thread (again, after :meth:`stop`); does nothing while it runs."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop_requested = False
            self._accepting = True
            self._publish_locked()  # no thread calls the engine yet: a snapshot is there from the start
            self._thread = threading.Thread(target=self._run, name="kvstack-engine-loop", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread: pending submissions are rejected, running requests finish ``"aborted"`` and their
        blocks are freed; returns once the thread has exited (or ``timeout`` seconds passed)."""
        with self._cond:
            self._accepting = False
            self._stop_requested = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("the engine loop did not stop within %s s (a step still running)", timeout)

    @property
    def is_running(self) -> bool:
        """Whether the thread is alive and accepting requests."""
        thread = self._thread
        return self._accepting and thread is not None and thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not over yet (waiting for the engine, waiting in it, or running)."""
        with self._cond:
            return self._in_flight

    def snapshot(self) -> dict[str, float | int] | None:
        """The engine's metrics as last published (at :meth:`start`, then after each iteration of the thread),
        plus ``num_blocks`` (the pool's size) and ``in_flight``; None before the first :meth:`start`."""
        snapshot = self._snapshot  # replaced whole by the engine thread: reading the reference is atomic
        return None if snapshot is None else dict(snapshot)

    # ------------------------------------------------------------------ submitting (event loop thread)
    def submit(self, submissions: Sequence[Submission], events: asyncio.Queue[Any], *,
               max_in_flight: int | None = None) -> list[RequestHandle]:
        """Queue requests for the engine, all or none; call from a coroutine (it binds the running loop).

        Parameters
        ----------
        submissions : sequence of Submission
            The requests; each handle's ``tag`` is its position here.
        events : asyncio.Queue
            Receives every :class:`SampleEvent` of these requests.
        max_in_flight : int or None, optional
            Refuse (:class:`QueueFullError`) when the requests in flight plus these would exceed it.

        Returns
        -------
        list of RequestHandle
            One per submission; await each ``accepted``.

        Raises
        ------
        EngineLoopStoppedError
            If the loop is not running.
        QueueFullError
            If ``max_in_flight`` would be exceeded; nothing is queued.
        """
        event_loop = asyncio.get_running_loop()
        handles = [RequestHandle(self, submission, tag, events, event_loop)
                   for tag, submission in enumerate(submissions)]
        with self._cond:
            if not self.is_running:
                raise EngineLoopStoppedError("the engine loop is not running")
            if max_in_flight is not None and self._in_flight + len(handles) > max_in_flight:
                raise QueueFullError(f"{self._in_flight} requests are in flight; {len(handles)} more would pass "
                                     f"the limit of {max_in_flight}")
            self._in_flight += len(handles)
            self._submissions.extend(handles)
            self._cond.notify_all()
        return handles

    def _abort(self, handle: RequestHandle) -> None:
        with self._cond:
            if handle._abort_requested:
                return
            handle._abort_requested = True
            self._aborts.append(handle)
            self._cond.notify_all()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._submissions or self._aborts or self._stop_requested or self._families):
                        self._cond.wait()
                    submissions, self._submissions = self._submissions, []
                    aborts, self._aborts = self._aborts, []
                    stopping = self._stop_requested
                if stopping:
                    self._shut_down(submissions, "the server is shutting down")
                    return
                self._admit(submissions)
                self._apply_aborts(aborts)
                if self._families:
                    self._step()
                self._publish()
                self._flush()
        except BaseException as error:  # a bug in the loop itself: fail everyone rather than hang them
            logger.exception("the engine loop crashed")
            with self._cond:
                self._accepting = False
                submissions, self._submissions = self._submissions, []
            self._shut_down(submissions, f"the engine loop crashed: {type(error).__name__}: {error}")
            if not isinstance(error, Exception):
                raise

    def _admit(self, submissions: list[RequestHandle]) -> None:
        """Add each new submission to the engine, or reject it with the engine's error."""
        for handle in submissions:
            if handle._abort_requested:  # its submitter gave up before it reached the engine
                self._release()
                continue
            spec = handle.submission
            try:
                request_id = self.engine.add_request(spec.prompt_token_ids, spec.params, spec.method)
            except Exception as error:  # KVStackError: a bad request; anything else is reported the same way
                if not isinstance(error, KVStackError):
                    logger.exception("add_request raised")
                self._release()
                self._resolve(handle, error=error)
                continue
            family = _Family(handle, request_id, spec.params.n, sample_of={request_id: 0})
            self._families[request_id] = family
            self._family_of_handle[handle] = family
            self._family_of_sample[request_id] = family
            self._resolve(handle, request_id=request_id)

    def _apply_aborts(self, handles: list[RequestHandle]) -> None:
        for handle in handles:
            family = self._family_of_handle.get(handle)
            if family is None:  # not admitted yet (dropped at admission) or already over
                continue
            try:
                self.engine.abort(family.request_id)  # frees its blocks now (no step is in progress)
            except KVStackError as error:
                logger.warning("abort of request %r failed: %s", family.request_id, error)
            self._close(family, "aborted", None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # Engine.step isolates failures itself; this is the last line of defence
            logger.exception("engine.step() raised; failing every request in flight")
            self._fail_all(f"{type(error).__name__}: {error}")
            self._flush()
            self._failures_in_a_row += 1
            with self._cond:  # back off so that an engine failing every step does not spin
                self._cond.wait(min(_MAX_BACKOFF_S, 0.01 * 2 ** self._failures_in_a_row))
            return
        self._failures_in_a_row = 0
        touched: dict[Hashable, _Family] = {}
        for output in outputs:
            family = self._deliver(output)
            if family is not None:
                touched[family.request_id] = family
        for family in touched.values():
            self._close_if_over(family)
        if self._families and not outputs and not self.engine.has_unfinished():
            # Nothing left to run yet requests not over: never leave their submitters waiting forever.
            for family in list(self._families.values()):
                self._close(family, "error", "the engine finished this request without reporting it")

    def _family_of(self, output: RequestOutput) -> _Family | None:
        """The family an output belongs to: its own request's, or (a forked sample) its parent's."""
        family = self._family_of_sample.get(output.request_id)
        if family is not None:
            return family
        # A sample not seen yet: the engine names its parent on its first output (the fork step) only.
        if output.parent_id is not None:
            family = self._families.get(output.parent_id)
        else:
            family = next((f for f in self._families.values()
                           if output.request_id in self.engine.children(f.request_id)), None)
        if family is not None:
            family.sample_of[output.request_id] = self.engine.children(family.request_id).index(output.request_id) + 1
            self._family_of_sample[output.request_id] = family
        return family

    def _deliver(self, output: RequestOutput) -> _Family | None:
        """Send one output to its request's queue; the family it belongs to (None if no longer tracked)."""
        family = self._family_of(output)
        if family is None:
            return None
        index = family.sample_of[output.request_id]
        error = getattr(output, "error", None)
        if output.finished:
            family.finished[output.request_id] = output.finish_reason or "error"
            if error is not None:
                family.errors[output.request_id] = error
            family.reported.add(index)
        self._emit(family.handle, SampleEvent(family.handle.tag, index, tuple(output.new_token_ids), output.finished,
                                              output.finish_reason, error))
        return family

    def _close_if_over(self, family: _Family) -> None:
        """Close the family once it and every sample forked from it finished."""
        if family.request_id not in family.finished:
            return
        if all(child in family.finished for child in self.engine.children(family.request_id)):
            # Samples never forked (the request failed or was aborted before its first token) end like it.
            reason = family.finished[family.request_id]
            error = family.errors.get(family.request_id)
            if reason not in ("error", "aborted"):
                reason, error = "error", "this sample was never started"
            self._close(family, reason, error)

    def _close(self, family: _Family, reason: str, error: str | None) -> None:
        """Report every sample not finished yet as finished with ``reason``, and forget the family, here and in
        the engine (which otherwise keeps every request's tokens for its lifetime)."""
        for index in range(family.n):
            if index not in family.reported:
                family.reported.add(index)
                self._emit(family.handle, SampleEvent(family.handle.tag, index, (), True, reason, error))
        try:
            self.engine.release(family.request_id)
        except Exception:  # only after an engine failure; the request is over for its submitter either way
            logger.warning("could not release request %r", family.request_id, exc_info=True)
        del self._families[family.request_id]
        del self._family_of_handle[family.handle]
        for sample_id in family.sample_of:
            del self._family_of_sample[sample_id]
        self._release()

    def _fail_all(self, message: str) -> None:
        for family in list(self._families.values()):
            try:
                self.engine.abort(family.request_id)
            except Exception:  # the engine is already in trouble; the request is reported failed either way
                logger.debug("abort of %r after a failed step raised", family.request_id, exc_info=True)
            self._close(family, "error", message)

    def _shut_down(self, submissions: list[RequestHandle], message: str) -> None:
        for handle in submissions:
            self._release()
            self._resolve(handle, error=EngineLoopStoppedError(message))
        for family in list(self._families.values()):
            try:
                self.engine.abort(family.request_id)
            except Exception:
                logger.debug("abort of %r at shutdown raised", family.request_id, exc_info=True)
            self._close(family, "aborted", message)
        self._flush()
        with contextlib.suppress(Exception):  # the engine may be what failed; the events are out already
            self._publish()

    def _publish(self) -> None:
        with self._cond:
            self._publish_locked()

    def _publish_locked(self) -> None:
        metrics: dict[str, float | int] = dict(self.engine.metrics())
        metrics["num_blocks"] = self.engine.pool.num_blocks
        metrics["in_flight"] = self._in_flight
        self._snapshot = metrics

    def _release(self) -> None:
        with self._cond:
            self._in_flight -= 1

    # ------------------------------------------------------------------ to the event loop
    def _emit(self, handle: RequestHandle, event: SampleEvent) -> None:
        """Queue an event; :meth:`_flush` sends it once the iteration's bookkeeping is done (so that a client
        seeing its request finish also sees its place in the queue released)."""
        self._outbox.append((handle, event))

    def _flush(self) -> None:
        """Send the queued events, one wake-up per event loop, in order."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, SampleEvent]]] = {}
        for handle, event in self._outbox:
            by_loop.setdefault(handle.event_loop, []).append((handle, event))
        self._outbox = []
        for event_loop, batch in by_loop.items():
            try:
                event_loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    @staticmethod
    def _resolve(handle: RequestHandle, *, request_id: Hashable = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if handle.accepted.done():  # the submitter was cancelled meanwhile
                return
            if error is not None:
                handle.accepted.set_exception(error)
            else:
                handle.accepted.set_result(request_id)

        try:
            handle.event_loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass


def _put_all(batch: list[tuple[RequestHandle, SampleEvent]]) -> None:
    """On the event loop: put each event in its request's queue."""
    for handle, event in batch:
        handle.events.put_nowait(event)
