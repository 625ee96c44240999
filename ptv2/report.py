"""What a job's data looks like to the model, before anyone pays for a run (`ptv2 inspect`, and
logged with every job's MLflow run): per split, its rows and bad rows, the label or tag
distribution, token lengths against `max_length`, what truncation cuts (examples, and labelled
tokens: the ones the loss is on), exact duplicate inputs within and across splits, and two
examples as the model reads them, the tokens that carry loss marked ⟦like this⟧.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from ptv2.artifact import sha256_file
from ptv2.data import DataError, data_format, encode_table, local_file, read_table
from ptv2.tasks import IGNORE_INDEX, task_of

SPLITS = (("train", "train_file"), ("validation", "validation_file"), ("test", "test_file"))


@dataclass
class SplitReport:
    split: str
    path: str
    format: str  # jsonl | csv | parquet
    sha256: str  # of the file: what MLflow records as the dataset's digest
    rows: int  # read (all of them, or the first `max_rows`)
    bad_rows: int
    bad: list[str]  # the first few, "row N: why"
    labels: dict[str, int] | None  # label (seq-cls) or tag (token-cls) -> count
    tokens_p50: int
    tokens_p95: int
    tokens_max: int
    max_length: int
    truncated_pct: float  # examples longer than max_length
    labelled_lost_pct: float  # labelled tokens (the loss's) cut by truncation
    duplicates: int  # inputs seen before in this split
    shared: dict[str, int] = field(default_factory=dict)  # other split -> inputs both hold
    examples: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what would make the run wrong or wasted

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


UNLIMITED = 10**9  # a max_length that truncates nothing: what the data would be without truncation


def _labelled(labels) -> int:
    """Labelled positions of one encoded example (a seq-cls label is one)."""
    return sum(1 for x in labels if x != IGNORE_INDEX) if isinstance(labels, list) else int(labels != IGNORE_INDEX)


def render(ids: list[int], labels, tokenizer, label_names) -> str:
    """One encoded example as the model reads it (special tokens included), the tokens that carry
    loss in ⟦⟧: a response, each tagged word's first sub-token with its tag, or a class after it."""
    if not isinstance(labels, list):
        name = label_names[labels] if label_names else labels
        return f"{tokenizer.decode(ids)} ⟦→ {name}⟧"
    pieces: list[tuple[list[int], str | None]] = []  # (tokens, None: no loss | "": loss | its tag)
    for token, label in zip(ids, labels, strict=True):
        mark = None if label == IGNORE_INDEX else label_names[label] if label_names else ""
        if pieces and mark in (None, "") and pieces[-1][1] == mark:
            pieces[-1][0].append(token)  # runs of unmarked tokens, and of response tokens, read as one
        else:
            pieces.append(([token], mark))
    out = []
    for tokens, mark in pieces:
        text = tokenizer.decode(tokens)
        out.append(text if mark is None else f"⟦{text}⟧" if mark == "" else f"⟦{text}/{mark}⟧")
    return "".join(out)


def split_report(
    split: str, path: str, data, task, labels, tokenizer, max_rows: int | None = None
) -> tuple[SplitReport, list[str]]:
    """The report of one data file (its first `max_rows` rows, if given), and its rows' inputs (to
    compare splits)."""
    task = task_of(task)
    table = read_table(path, data.format)
    if max_rows is not None and len(table) > max_rows:
        table = table.select(range(max_rows))
    missing = [c for c in task.columns(data) if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(table.column_names)})")
    kept = encode_table(table, data, task, labels, tokenizer)
    full = encode_table(table, data.model_copy(update={"max_length": UNLIMITED}), task, labels, tokenizer)
    errors = kept["_error"]
    good = [i for i, e in enumerate(errors) if not e]
    kept_ids, full_ids = kept["input_ids"], full["input_ids"]
    kept_labels, full_labels = kept["labels"], full["labels"]
    lengths = [len(full_ids[i]) for i in good]
    truncated = sum(len(full_ids[i]) > len(kept_ids[i]) for i in good)
    labelled_full = sum(_labelled(full_labels[i]) for i in good)
    labelled_kept = sum(_labelled(kept_labels[i]) for i in good)
    target = task.target_column(data)
    inputs_of = [c for c in task.columns(data) if c != target]
    columns = {c: table[c] for c in [*inputs_of, target]}
    inputs = [json.dumps([columns[c][i] for c in inputs_of], ensure_ascii=False) for i in good]
    counts = None
    if task.labelled:
        values = [columns[target][i] for i in good]
        counts = Counter(str(v) for row in values for v in (row if isinstance(row, list) else [row]))
    seen, duplicates = set(), 0
    for text in inputs:
        duplicates += text in seen
        seen.add(text)
    bad = [(i, e) for i, e in enumerate(errors) if e]
    report = SplitReport(
        split=split,
        path=str(path),
        format=data_format(path, data.format),
        sha256=sha256_file(local_file(path)),
        rows=len(errors),
        bad_rows=len(bad),
        bad=[f"row {i + 1}: {e}" for i, e in bad[:5]],
        labels=dict(sorted(counts.items())) if counts is not None else None,
        tokens_p50=_percentile(lengths, 0.5),
        tokens_p95=_percentile(lengths, 0.95),
        tokens_max=max(lengths, default=0),
        max_length=data.max_length,
        truncated_pct=100 * truncated / max(len(good), 1),
        labelled_lost_pct=100 * (labelled_full - labelled_kept) / max(labelled_full, 1),
        duplicates=duplicates,
        examples=[render(kept_ids[i], kept_labels[i], tokenizer, labels) for i in good[:2]],
    )
    return report, inputs


def dataset_report(data, task, labels, tokenizer, max_rows: int | None = None) -> list[SplitReport]:
    """The report of every split the job's data settings name (`max_rows`: of each file's first rows)."""
    reports, inputs = [], {}
    for split, key in SPLITS:
        path = getattr(data, key)
        if path is None:
            continue
        report, texts = split_report(split, path, data, task, labels, tokenizer, max_rows)
        for other, theirs in inputs.items():
            report.shared[other] = len(set(texts) & theirs)
        inputs[split] = set(texts)
        report.warnings = _warnings(report, data, task_of(task), labels)
        reports.append(report)
    return reports


def _warnings(r: SplitReport, data, task, labels) -> list[str]:
    out = []
    if r.bad_rows:
        out.append(f"{r.bad_rows} bad row(s): a job refuses this file until they are fixed")
    if r.rows > r.bad_rows and r.truncated_pct == 100:
        out.append(f"every example is longer than data.max_length {r.max_length}")
    if r.labelled_lost_pct > 0:
        fix = "raise data.max_length" + (" or shorten data.prompt_template" if task.generates else "")
        out.append(f"truncation cuts {r.labelled_lost_pct:.1f}% of the tokens the loss is on: {fix}")
    for other, n in r.shared.items():
        if n:
            out.append(f"{n} input(s) also in {other}: {r.split} metrics on them overstate what the prompt learnt")
    if r.labels is not None and r.split == "train" and labels and task.every_label_seen:
        absent = [name for name in labels if name not in r.labels]
        if absent:
            out.append(f"label(s) {', '.join(absent)} never occur in the training data")
    return out


def job_report(model, data, max_rows: int | None = None) -> list[SplitReport]:
    """The report of a job's data (`model`, `data`: its settings), with the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
    return dataset_report(data, model.task, model.labels, tokenizer, max_rows)


def format_report(reports: list[SplitReport]) -> str:
    """The reports as the terminal shows them."""
    lines = []
    for r in reports:
        lines.append(f"{r.split}: {r.path}")
        lines.append(f"  rows {r.rows}, bad rows {r.bad_rows}" + (f" ({'; '.join(r.bad)})" if r.bad else ""))
        if r.labels is not None:
            total = sum(r.labels.values()) or 1
            shown = ", ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in r.labels.items())
            lines.append(f"  labels: {shown}")
        lines.append(
            f"  tokens p50 {r.tokens_p50}, p95 {r.tokens_p95}, max {r.tokens_max} (max_length {r.max_length}); "
            f"truncated {r.truncated_pct:.1f}% of examples, {r.labelled_lost_pct:.1f}% of labelled tokens lost"
        )
        shared = ", ".join(f"{n} with {s}" for s, n in r.shared.items())
        lines.append(f"  duplicate inputs: {r.duplicates} within" + (f", {shared}" if shared else ""))
        for example in r.examples:
            lines.append("  example: " + example.replace("\n", "⏎"))
        for warning in r.warnings:
            lines.append(f"  warning: {warning}")
    return "\n".join(lines)
