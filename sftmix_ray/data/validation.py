"""Validate a corpus row by row: keep every valid row, report every rejected one with its reason.

Rows are numbered from 0 in file order (for JSON Lines, blank lines are not rows and are not
numbered). `total == valid + rejected` always holds: no row is dropped without a reason.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftmix_ray.data.formats import (
    FORMATS,
    Message,
    detect_format,
    format_of,
    read_example,
)
from sftmix_ray.data.readers import iter_records
from sftmix_ray.errors import DataError, RowRejected

ValidPair = tuple[int, list[Message]]


EXAMPLES_PER_KIND = 5


@dataclass(frozen=True)
class Rejection:
    """One rejected row: its 0-based index in the corpus, why, and the kind of problem."""

    index: int
    reason: str
    kind: str = "invalid"


def rejections_by_kind(rejections: Sequence[Rejection]) -> dict[str, dict[str, Any]]:
    """`{kind: {"count": n, "examples": [first row indices]}}`, most frequent kind first."""
    groups: dict[str, list[int]] = defaultdict(list)
    for rejection in rejections:
        groups[rejection.kind].append(rejection.index)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return {k: {"count": len(v), "examples": v[:EXAMPLES_PER_KIND]} for k, v in ordered}


@dataclass
class ValidationReport:
    """Counts of valid and rejected rows, each rejection with its reason, and the format used."""

    total: int
    valid: int
    rejected: int
    rejections: list[Rejection] = field(default_factory=list)
    format: str = "auto"
    repairs: dict[str, int] = field(default_factory=dict)  # kind -> kept rows repaired so

    def __post_init__(self) -> None:
        assert self.total == self.valid + self.rejected, "total must equal valid + rejected"
        assert self.rejected == len(self.rejections), "one Rejection per rejected row"

    def to_json(self) -> dict[str, Any]:
        """The report as the JSON object `validate-data --json` prints."""
        assert self.total == self.valid + self.rejected
        return {
            "total": self.total,
            "valid": self.valid,
            "rejected": self.rejected,
            "rejections": [{"index": r.index, "reason": r.reason} for r in self.rejections],
            "format": self.format,
            "by_kind": rejections_by_kind(self.rejections),
            "repairs": self.repairs,
        }


def validate_rows(
    rows: Iterable[Any],
    fmt: str = "auto",
    *,
    source: str | None = None,
    repair: str = "standard",
    keep_valid: bool = True,
    history_masked: bool = False,
    reasoning: str = "keep",
    templates: tuple[str | None, str | None] = (None, None),
    detected: str | None = None,
) -> tuple[list[ValidPair], ValidationReport]:
    """Normalize every row; return the valid (row index, messages) pairs and the report.

    `auto` reads each row in its own format, as prepare does (the report's format is the one
    format of the valid rows, or `mixed (alpaca 2, messages 1)`); the corpus must have a row of
    a known format, found by reading `rows` twice unless the caller `detected` it.
    `rows` may be a stream (one pass) unless `fmt` is `auto` without `detected`. `repair`
    is `data.repair` (`standard` repairs what real dumps break, counted per kind and row;
    `none` is strict); `templates` are a text row's markers (`data.response_template`,
    `data.instruction_template`). `source` (a file name) prefixes the DataError raised when
    `auto` cannot detect a format. `keep_valid=False` returns no pairs, so memory holds only
    the rejections.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    try:
        resolved = detected or (detect_format(rows) if fmt == "auto" else fmt)
    except DataError as exc:
        raise DataError(f"{source}: {exc}" if source else str(exc)) from None
    used: Counter[str] = Counter()  # the valid rows' formats
    valid: list[ValidPair] = []
    rejections: list[Rejection] = []
    repairs: Counter[str] = Counter()
    total = n_valid = 0
    for index, row in enumerate(rows):
        total += 1
        try:
            row_fmt = format_of(row, resolved, fmt == "auto")  # counted below
            _, messages, _, applied = read_example(
                row, row_fmt, repair, history_masked=history_masked, reasoning=reasoning,
                templates=templates,
            )  # fmt: skip
        except RowRejected as exc:
            rejections.append(Rejection(index, exc.reason, exc.kind))
            continue
        n_valid += 1
        used[row_fmt] += 1
        if keep_valid:
            valid.append((index, messages))
        repairs.update(applied)  # each kind once per row
    report = ValidationReport(
        total=total,
        valid=n_valid,
        rejected=len(rejections),
        rejections=rejections,
        format=_format_used(used, resolved),
        repairs=dict(repairs.most_common()),
    )
    return valid, report


def validate_file(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    *,
    hf_split: str = "train",
    repair: str = "standard",
    keep_valid: bool = True,
    columns: dict[str, str] | None = None,
    history_masked: bool = False,
    reasoning: str = "keep",
    templates: tuple[str | None, str | None] = (None, None),
) -> tuple[list[ValidPair], ValidationReport]:
    """Stream a corpus (file, directory, URI or HF dataset) and validate every row, its
    columns renamed by `columns` (`data.columns`) as prepare does."""
    from sftmix_ray.data.columns import rename_columns
    from sftmix_ray.data.prepare import resolve_format

    source = os.fspath(path)
    resolved = resolve_format(source, fmt, hf_split, columns) if fmt in FORMATS else fmt
    rows = (rename_columns(row, columns) for row in iter_records(path, hf_split=hf_split))
    return validate_rows(
        rows, fmt, source=source, repair=repair, keep_valid=keep_valid,
        history_masked=history_masked, reasoning=reasoning, templates=templates,
        detected=resolved,
    )  # fmt: skip


def _format_used(used: Counter[str], first: str) -> str:
    """The valid rows' one format, or `mixed (...)` with the count of each; with no valid row,
    the corpus' first detected format."""
    if len(used) <= 1:
        return next(iter(used), first)
    return "mixed (" + ", ".join(f"{k} {n}" for k, n in sorted(used.items())) + ")"


def format_report(
    report: ValidationReport, path: str | os.PathLike[str], max_listed: int = 20
) -> str:
    """A human-readable summary: counts, reasons grouped with counts, then the first rejections."""
    lines = [
        f"{os.fspath(path)}: {report.total} {_plural(report.total, 'row')}, {report.valid} valid, "
        f"{report.rejected} rejected (format: {report.format})"
    ]
    if report.repairs:
        repaired = ", ".join(f"{kind} {count}" for kind, count in report.repairs.items())
        lines.append(f"repaired (kept): {repaired}")
    if not report.rejections:
        return "\n".join(lines)
    groups: dict[str, list[int]] = defaultdict(list)
    for rejection in report.rejections:
        groups[rejection.reason].append(rejection.index)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1][0]))
    lines.append(f"rejected {report.rejected} {_plural(report.rejected, 'row')} by reason:")
    for reason, indices in ordered:
        shown = ", ".join(str(i) for i in indices[:5]) + (", ..." if len(indices) > 5 else "")
        lines.append(f'  {len(indices)} x "{reason}" ({_plural(len(indices), "row")} {shown})')
    listed = report.rejections[: max(max_listed, 0)]
    if listed:
        lines.append(f"first {len(listed)} rejected {_plural(len(listed), 'row')} (0-based):")
        lines.extend(f"  row {r.index}: {r.reason}" for r in listed)
    if report.rejected > len(listed):
        lines.append(f"  ... and {report.rejected - len(listed)} more")
    return "\n".join(lines)


def _plural(count: int, word: str) -> str:
    """`word` or `word + "s"` to agree with `count`."""
    return word if count == 1 else f"{word}s"
