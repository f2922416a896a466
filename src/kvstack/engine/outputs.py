"""What the engine reports for a request: its new tokens each step (:class:`RequestOutput`) and its latency
(:class:`RequestTiming`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

__all__ = ["RequestOutput", "RequestTiming"]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request.

    Attributes
    ----------
    request_id : hashable
        The request.
    new_token_ids : list of int
        Tokens generated in this step (empty when it finished by abort).
    finished : bool
        Whether the request is finished.
    finish_reason : str or None
        ``"length"``, ``"eos"`` (a stop token), ``"stop"`` (a stop string), ``"aborted"`` or ``"error"`` (the
        step raised for this request; the engine failed it alone) once finished, else None.
    parent_id : hashable or None
        For a parallel sample (``n > 1``) forked from a request, that request's id.
    error : str or None
        With ``finish_reason == "error"``: what was raised, as ``"TypeName: message"``.
    """

    request_id: Hashable
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    parent_id: Hashable | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """Latency of one request, in seconds of ``time.perf_counter``.

    Attributes
    ----------
    ttft : float or None
        Arrival to first generated token (None before it).
    tpot : float or None
        Mean time per output token after the first: ``(finish - first) / (tokens - 1)``; None before the
        request finished or when it produced one token.
    e2e : float or None
        Arrival to finish (None while running).
    num_output_tokens : int
        Tokens generated so far.
    """

    ttft: float | None
    tpot: float | None
    e2e: float | None
    num_output_tokens: int
