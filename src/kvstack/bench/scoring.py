"""Scorers: RULER's string-match metrics and perplexity.

RULER (Hsieh et al., 2024) scores a prediction against its reference answers by case-insensitive
substring match:

* ``string_match_all``: the fraction of references found in the prediction (every needle must be
  recalled for full marks), times 100;
* ``string_match_part``: 100 if any reference is found, else 0.

Perplexity cells report ``exp(mean NLL)``; lower is better. Every other score is higher-is-better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["HIGHER_IS_BETTER", "SCORERS", "score", "string_match_all", "string_match_part"]


def _check(prediction: str, references: Sequence[str]) -> list[str]:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    refs = list(references)
    if not refs:
        raise ValueError("at least one reference answer is needed")
    return refs


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Percentage of ``references`` that occur (case-insensitively) in ``prediction``.

    Parameters
    ----------
    prediction:
        The model's generated text.
    references:
        Reference answers; each counts ``100 / len(references)``.

    Returns
    -------
    float
        A score in ``[0, 100]``.

    Examples
    --------
    >>> string_match_all("They are 12 and 7.", ["12", "7", "9"])
    66.66666666666667
    """
    refs = _check(prediction, references)
    text = prediction.lower()
    return 100.0 * sum(ref.lower() in text for ref in refs) / len(refs)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """100 if any of ``references`` occurs (case-insensitively) in ``prediction``, else 0.

    Examples
    --------
    >>> string_match_part("maybe 7", ["12", "7"])
    100.0
    """
    refs = _check(prediction, references)
    text = prediction.lower()
    return 100.0 * max(ref.lower() in text for ref in refs)


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
"""Generation scorers by name (the ``scorer`` attribute of a task)."""

HIGHER_IS_BETTER: dict[str, bool] = {"string_match_all": True, "string_match_part": True, "perplexity": False}
"""Direction of every score kind, for reports and plots."""


def score(kind: str, prediction: str, references: Sequence[str]) -> float:
    """Score ``prediction`` with the scorer named ``kind`` (see :data:`SCORERS`)."""
    try:
        scorer = SCORERS[kind]
    except KeyError:
        raise ValueError(f"unknown scorer {kind!r}; choose one of {', '.join(SCORERS)}") from None
    return scorer(prediction, references)
