"""The bench's files: ``results.jsonl`` (finished cells), ``partial.jsonl`` (checkpoints), the run's config.

Each finished cell is appended to ``results.jsonl`` as one JSON line, flushed and fsynced before the next
starts, so an interrupted run loses only the cell that was under way (see :func:`append_result`). Reports
show one record per cell identity (:func:`reported_results`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from kvstack.bench.cells import cell_key
from kvstack.bench.config import BenchConfig, BenchError

__all__ = [
    "CHECKPOINT_FILE",
    "RESULTS_FILE",
    "STALE_FILE",
    "append_result",
    "cell_identity",
    "checkpoint_record",
    "ensure_output_dir",
    "extendable_records",
    "key_without_samples",
    "latest_results",
    "read_results",
    "reported_results",
    "save_checkpoints",
    "set_aside_stale",
    "write_run_config",
]

RESULTS_FILE = "results.jsonl"

CHECKPOINT_FILE = "partial.jsonl"
"""Where :attr:`BenchConfig.checkpoint_every` saves cells still under way: one record per such cell, with the
samples done so far (its ``config`` and ``key`` say that sample count), removed once the cell is finished."""

STALE_FILE = "stale.jsonl"
"""Where :func:`set_aside_stale` moves the records of cells measured with calibration files that have changed
since, before the cells are measured again."""


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of ``results.jsonl`` (or ``partial.jsonl``), in file order.

    Only a torn last line, left by an interrupted write (no newline after it), is skipped, with a warning on
    stderr; :func:`append_result` removes it before the next record. Any other line that is not a record
    raises :class:`BenchError` naming the file and line, so a report never loses a cell without a word.
    """
    file = Path(path)
    if not file.exists():
        return []
    lines = file.read_text(encoding="utf-8").split("\n")
    unfinished = lines.pop()  # the text after the last newline: "" unless a write was interrupted
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            records.append(_parse_record(line, file, number))
    if unfinished.strip():
        try:
            records.append(_parse_record(unfinished, file, len(lines) + 1))
        except BenchError:
            print(f"kvstack: {file}:{len(lines) + 1}: skipping a torn last line (an interrupted write)",
                  file=sys.stderr)
    return records


def _parse_record(line: str, file: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BenchError(f"{file}:{number}: damaged record ({err.msg} at column {err.colno}); repair or delete "
                         "that line, then run again") from None
    if not isinstance(record, dict) or "key" not in record:
        raise BenchError(f"{file}:{number}: not a kvstack record (no 'key'); repair or delete that line")
    return record


def _drop_torn_tail(fh: Any) -> None:
    """Cut an unfinished last line (an interrupted write) off the end of ``fh``, opened ``a+b`` / ``r+b``."""
    end = fh.seek(0, os.SEEK_END)
    position = end
    while position > 0:
        step = min(1 << 16, position)
        fh.seek(position - step)
        block = fh.read(step)
        newline = block.rfind(b"\n")
        if newline >= 0:
            position = position - step + newline + 1
            break
        position -= step
    if position == end:
        return
    print(f"kvstack: {getattr(fh, 'name', 'results')}: removing a torn last line (an interrupted write)",
          file=sys.stderr)
    fh.truncate(position)


def latest_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One record per cell key: the last one written to ``results.jsonl`` (a re-run cell replaces the old).

    A record that a later one extended with more samples (named in its ``extended_from``) is left out.
    """
    latest = {record["key"]: record for record in read_results(path)}
    extended = {record["extended_from"]["key"] for record in latest.values() if record.get("extended_from")}
    return [record for key, record in latest.items() if key not in extended]


def cell_identity(record: dict[str, Any]) -> tuple[str, str, str, str, int, str]:
    """What a report row stands for: (model, method, task, variant, length, query mode).

    Records of one identity that differ in anything else (seed, sample count, harness or task version,
    chat template, answer prefix, decode limit, prose file, device) are different measurements of it.
    """
    return (str(record["model"]), str(record["method"]), str(record["task"]), str(record.get("variant", "")),
            int(record["length"]), str(record["query_mode"]))


def reported_results(records: Sequence[dict[str, Any]],
                     prefer: Collection[str] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records a report shows, one per :func:`cell_identity`, and the ones it leaves out.

    Reports average over variants and lengths, so two measurements of one identity (say ``--seed 0``
    and ``--seed 1`` written to the same directory) must not both reach them. Where several records
    share an identity the report keeps the one whose key is in ``prefer`` (the cells the current run
    planned), else the one finished last; ``results.jsonl`` keeps every record.

    Parameters
    ----------
    records:
        One record per cell key, e.g. :func:`latest_results`.
    prefer:
        Cell keys that win over other records of their identity.

    Returns
    -------
    (shown, left_out)
        ``shown`` in the order of ``records``.
    """
    chosen: dict[tuple[str, str, str, str, int, str], dict[str, Any]] = {}
    for record in records:
        identity = cell_identity(record)
        held = chosen.get(identity)
        if held is None or _report_rank(record, prefer) > _report_rank(held, prefer):
            chosen[identity] = record
    kept = {id(record) for record in chosen.values()}
    shown = [record for record in records if id(record) in kept]
    return shown, [record for record in records if id(record) not in kept]


def _report_rank(record: dict[str, Any], prefer: Collection[str]) -> tuple[bool, str]:
    return record["key"] in prefer, str(record.get("finished_at") or "")


def key_without_samples(config: dict[str, Any]) -> str:
    """The key of a cell configuration with its sample count left out: one per cell, whatever its samples."""
    return cell_key({k: v for k, v in config.items() if k != "samples"})


def extendable_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Finished records by their configuration without the sample count: for each, the one with most samples."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        config = record.get("config")
        if not config or record.get("samples") != config.get("samples"):
            continue
        key = key_without_samples(config)
        if key not in best or record["samples"] >= best[key]["samples"]:
            best[key] = record
    return best


def append_result(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record as a JSON line, then flush and fsync, so a finished cell survives a crash."""
    line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
    with open(path, "r+b" if Path(path).exists() else "w+b") as fh:
        _drop_torn_tail(fh)  # its record was never finished; the file holds only whole lines
        fh.seek(0, os.SEEK_END)
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoints(path: str | os.PathLike[str], records: Sequence[dict[str, Any]],
                     finished: Sequence[dict[str, Any]] = ()) -> None:
    """Rewrite the checkpoint file with ``records`` in place of earlier checkpoints of the same cells.

    Checkpoints of the cells of ``finished`` (full records) are dropped too. A cell is named by its
    configuration without the sample count. The file is replaced atomically (written beside it, then
    renamed), so an interruption leaves either the old checkpoints or the new ones.
    """
    file = Path(path)
    replaced = {key_without_samples(record["config"]) for record in [*records, *finished]}
    kept = [record for record in read_results(file)
            if record.get("config") and key_without_samples(record["config"]) not in replaced]
    kept += list(records)
    if not kept and not file.exists():
        return
    _rewrite(file, kept)


def _rewrite(file: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace ``file`` by the JSON lines of ``records``, atomically (written beside it, fsynced, renamed)."""
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, default=_json_default, allow_nan=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, file)


def set_aside_stale(out_dir: Path, cell_configs: Sequence[dict[str, Any]]) -> list[str]:
    """Take out of ``results.jsonl`` and ``partial.jsonl`` the records of the cells of ``cell_configs`` whose
    calibration files (a record's ``artefacts``: ``{path: sha256}``) now hold other bytes, so those cells are
    measured again. Finished records are appended to ``stale.jsonl`` first (nothing is lost), checkpoints
    dropped. A file that is gone cannot be checked, and its records stay. Returns the paths that changed."""
    from kvstack.calibration.artefact import file_digest

    planned = {key_without_samples(config) for config in cell_configs}
    digests: dict[str, str | None] = {}

    def changed(record: dict[str, Any]) -> list[str]:
        config = record.get("config")
        if not record.get("artefacts") or not config or key_without_samples(config) not in planned:
            return []
        for path in record["artefacts"]:
            if path not in digests:
                digests[path] = file_digest(Path(path)) if Path(path).is_file() else None
        return [path for path, digest in record["artefacts"].items() if digests[path] not in (None, digest)]

    changed_paths: dict[str, None] = {}
    for name in (RESULTS_FILE, CHECKPOINT_FILE):
        file = out_dir / name
        records = read_results(file)
        changes = [changed(record) for record in records]
        if not any(changes):
            continue
        for record, paths in zip(records, changes, strict=True):
            if paths:
                changed_paths.update(dict.fromkeys(paths))
                if name == RESULTS_FILE:
                    append_result(out_dir / STALE_FILE, record)
        _rewrite(file, [record for record, paths in zip(records, changes, strict=True) if not paths])
    return list(changed_paths)


def checkpoint_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a cell measured over its first ``record['samples']`` samples) keyed as a cell of that many
    samples: what :func:`extendable_records` resumes from."""
    config = {**record["config"], "samples": int(record["samples"])}
    return {**record, "key": cell_key(config), "config": config, "checkpoint": True}


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def ensure_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and check files can be written in it; :class:`BenchError` otherwise."""
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
        results = directory / RESULTS_FILE
        if results.exists() and not os.access(results, os.W_OK):
            raise PermissionError(f"{results} is read-only")
    except OSError as err:
        reason = err.strerror or str(err)
        raise BenchError(f"cannot write to output directory {str(directory)!r} ({reason}); "
                         "choose a writable --out") from None
    return directory


def write_run_config(out_dir: Path, config: BenchConfig) -> None:
    """Write ``config`` to ``last-run-config.json`` in ``out_dir`` (replaced atomically)."""
    path = out_dir / "last-run-config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
