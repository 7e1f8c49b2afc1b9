"""A large JSONL or Parquet file read by several processes: a JSONL file by byte ranges cut at line ends, a Parquet
file by runs of row groups; the lengths are joined in file order. Counting tokens is Python-bound (the regex, the
memo, the chat template), so on a machine with more than one core the processes divide the wall time.

A Parquet file with a single row group, JSON and CSV are read by one process. The workers
are forked after the tokenizer is loaded and before it has encoded anything in them, so each starts with the
same state and no thread of the Rust library is copied mid-work.
"""
from __future__ import annotations

import os
from pathlib import Path

MIN_BYTES = 64 * 2**20  # below this one process is as fast (a fork and its imports cost ~0.1 s)
_JOB: tuple = ()  # (function, arguments) the forked workers run: inherited, never pickled


def ranges(path: str, workers: int | None = None, min_bytes: int = MIN_BYTES) -> list[tuple[int, int, int]] | None:
    """[(start byte, end byte, lines before start)] of a JSONL file, or [(first row group, end row group, rows
    before)] of a Parquet file, for `workers` processes (default: the usable cores, at most 8); None when the file
    is small, of another format, or one core is all there is."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in (".jsonl", ".ndjson", ".parquet") or not p.is_file():
        return None
    size = p.stat().st_size
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    import multiprocessing

    if workers < 2 or size < max(min_bytes, 1) or "fork" not in multiprocessing.get_all_start_methods():
        return None  # (no fork on Windows: one process)
    if p.suffix.lower() == ".parquet":
        return _row_groups(p, workers)
    starts = [0]
    with open(p, "rb") as f:
        for i in range(1, workers):
            f.seek(size * i // workers)
            f.readline()  # to the next line end
            if f.tell() > starts[-1] and f.tell() < size:
                starts.append(f.tell())
        lines, offsets, pos = 0, [0], 0
        f.seek(0)
        for start in starts[1:]:
            while pos < start:
                block = f.read(min(16 * 2**20, start - pos))
                lines += block.count(b"\n")
                pos += len(block)
            offsets.append(lines)
    ends = starts[1:] + [size]
    return list(zip(starts, ends, offsets)) if len(starts) > 1 else None


def _row_groups(p: Path, workers: int) -> list[tuple[int, int, int]] | None:
    """[(first row group, end row group, rows before)]: contiguous runs of about equal rows."""
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(p).metadata
    except Exception:  # noqa: BLE001 - not readable here: the one-process path reports why
        return None
    rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if len(rows) < 2:
        return None
    total, parts, start, before, acc = sum(rows), [], 0, 0, 0
    for i, n in enumerate(rows):
        acc += n
        if acc >= total * (len(parts) + 1) / workers and i + 1 < len(rows) and len(parts) < workers - 1:
            parts.append((start, i + 1, before))
            start, before = i + 1, acc
    parts.append((start, len(rows), before))
    return parts if len(parts) > 1 else None


def run(function, parts: list, *args) -> list:
    """function(part, *args) for every part, each in its own forked process; the results in order. A worker's
    exception is raised here."""
    import multiprocessing

    global _JOB
    _JOB = (function, args)
    quiet = "TOKENIZERS_PARALLELISM" not in os.environ
    if quiet:  # the children encode only a few checked batches; no fork warning from the Rust library
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        # Pool forks every worker in its constructor, before it starts its own threads
        with multiprocessing.get_context("fork").Pool(len(parts)) as pool:
            return pool.map(_work, parts, chunksize=1)
    finally:
        _JOB = ()
        if quiet:
            del os.environ["TOKENIZERS_PARALLELISM"]


def _work(part):
    function, args = _JOB
    return function(part, *args)
