"""The progress bar of ``kvstack bench`` and ``kvstack engine-bench``, and the line printed for each cell."""

from __future__ import annotations

from typing import Any

__all__ = ["ProgressBar", "cell_line"]


def cell_line(record: dict[str, Any]) -> str:
    """One line of a finished cell's figures: score, KV bytes held and full, compression ratio, speed."""
    variant = f" {record['variant']}" if record["variant"] else ""
    speed = record.get("decode_tokens_per_s") or record.get("stream_tokens_per_s")
    return (f"{record['task']}{variant} L={record['length']} {record['method']}: score {record['score']:.2f} | "
            f"kv {record['kv_bytes'] / 1e6:.2f}/{record['full_kv_bytes'] / 1e6:.2f} MB "
            f"(cr {record['compression_ratio']:.2f}) | {speed or float('nan'):.1f} tok/s")


class ProgressBar:
    """A rich progress bar with ETA on stderr, or nothing (``enabled`` False or nothing to do).

    Parameters
    ----------
    enabled : bool
        Show it.
    total : int
        Units of work.
    label : str, optional
        Bold label before the description.
    unit : str, optional
        What is counted (shown after ``done/total``).
    """

    def __init__(self, enabled: bool, total: int, label: str = "bench", unit: str = "samples") -> None:
        self.bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=total)

    def update(self, completed: int, description: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, description=description)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, amount: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, amount)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
