"""`--dataset FILE --tokenizer PATH`: the token lengths of a training set, and the per-step shapes the trainer builds
from them, so that the plan is for the step that sets the peak, not for one nominal length.

Reading (torch-free, streamed): JSONL line by line, CSV row by row, Parquet by record batches (pyarrow), JSON as one
document (a list of rows, or {"data"|"train": [...]}). Each row becomes text the way the trainers build it:
- chat rows (`messages` / `conversations`, role/content or ShareGPT from/value) through the tokenizer's chat template
  (tokenizer_config.json `chat_template`, rendered as transformers' apply_chat_template does: chat.py), then
  tokenized without special tokens (the template writes them);
- prompt/completion rows (TRL) as the two texts tokenized separately and added (prompt with special tokens);
- alpaca rows (instruction/input/output; axolotl `type: alpaca`) in the Stanford Alpaca prompt;
- otherwise the text field (`text`, or the one the config or --text-field names), with special tokens.
Tokenizing uses the Rust `tokenizers` library (a tokenizer.json in a local folder, or a hub id in the local cache:
never downloaded), counted in batches by tokencount.py (the tokenizer's counts without its per-byte bookkeeping).

The per-step shapes the trainer builds from the lengths, and their memory: memplan/integrations/steps.py.
"""
from __future__ import annotations

import csv
import json
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from memplan.errors import MemplanError
from memplan.integrations.steps import (ORDERS, DatasetPlan, largest_cutoff, lengths_of, plan,  # noqa: F401
                                        steps, _length_grouped, _pack)

FORMATS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
CHUNK = 2048  # rows tokenized per encode_batch call
ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n{output}")


# ----------------------------------------------------------------------------------------------- tokenizer

@dataclass
class Tokenizer:
    tok: object  # tokenizers.Tokenizer
    path: str
    chat_template: str | None
    special: dict  # bos_token, eos_token, ... as strings (for the chat template)


def load_tokenizer(ref: str) -> Tokenizer:
    """A tokenizer.json: the file, a folder holding it, or a hub id in the local Hugging Face cache."""
    from tokenizers import Tokenizer as Fast

    p = Path(ref).expanduser()
    if p.is_file():
        folder, file = p.parent, p
    elif p.is_dir():
        folder, file = p, p / "tokenizer.json"
    else:
        folder = _hub_snapshot(ref)
        if folder is None:
            raise MemplanError(f"--tokenizer {ref!r}: not a file, a folder, or a hub id in the local Hugging Face "
                               "cache (memplan never downloads)")
        file = folder / "tokenizer.json"
    if not file.is_file():
        raise MemplanError(f"--tokenizer {ref!r}: no tokenizer.json in {folder} (memplan reads the fast tokenizer "
                           "format; save it with AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
    try:
        tok = Fast.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the Rust library raises its own Exception type
        raise MemplanError(f"--tokenizer {ref!r}: cannot read {file.name}: {str(e).splitlines()[0][:200]}") from None
    cfg = {}
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            cfg = {}
    template = cfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    special = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(k)
        special[k] = v.get("content") if isinstance(v, dict) else v
    return Tokenizer(tok, str(file), template if isinstance(template, str) else None, special)


def _hub_snapshot(repo_id: str) -> Path | None:
    if "/" not in repo_id or repo_id.startswith((".", "/", "~")):
        return None
    from memplan.catalog import _hub_cache_config

    cfg = _hub_cache_config(repo_id)
    if cfg is not None:
        return cfg.parent
    import os

    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    snaps = Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub"))) / \
        ("models--" + repo_id.replace("/", "--")) / "snapshots"
    found = sorted(snaps.glob("*/tokenizer.json")) if snaps.is_dir() else []
    return found[-1].parent if found else None


# ----------------------------------------------------------------------------------------------- the rows

def iter_rows(path: str, columns_for=None, part: tuple | None = None):
    """Rows of a dataset file, streamed (JSON is read whole). Parquet reads only the columns that
    `columns_for(first_row)` names (all when it returns None): the text, not the ids and metadata beside it.
    Reads only `part` when given (split.ranges): JSONL (start byte, end byte, lines before), Parquet (first row
    group, end row group, rows before)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise MemplanError(f"--dataset {path!r} is a directory; give a .jsonl, .json, .csv or .parquet file")
    if not p.is_file():
        raise MemplanError(f"--dataset {path!r}: no such file")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise MemplanError(f"--dataset {path!r}: unknown format {suffix or '(none)'}; memplan reads "
                           f"{', '.join(FORMATS)}")
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(p, path, *(part or (0, None, 0)))
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise MemplanError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        except UnicodeDecodeError:
            raise MemplanError(f"{path}: not UTF-8 text") from None
        if isinstance(data, dict):
            data = next((data[k] for k in ("data", "train", "rows") if isinstance(data.get(k), list)), None)
        if not isinstance(data, list):
            raise MemplanError(f"{path}: expected a list of rows (or {{\"data\": [...]}})")
        yield from data
    elif suffix in (".csv", ".tsv"):
        with open(p, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        yield from _parquet_rows(p, path, columns_for, part)


def _jsonl_rows(p: Path, path: str, start: int = 0, end: int | None = None, lines_before: int = 0):
    """JSON lines, parsed by orjson when it is installed (several times faster than json; any line it refuses,
    such as NaN, is parsed again by json, so the rows are json's). From byte `start` (a line start) to `end`."""
    try:
        from orjson import loads as fast_loads
    except ImportError:
        fast_loads = None
    with open(p, "rb") as f:
        f.seek(start)
        lines = f if end is None else _until(f, end - start)
        for n, line in enumerate(lines, lines_before + 1):
            if fast_loads is not None:
                try:
                    yield fast_loads(line)
                    continue
                except ValueError:
                    if not line.strip():
                        continue
            elif not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise MemplanError(f"{path}: line {n}: malformed JSON: {e.msg}") from None
            except UnicodeDecodeError:
                raise MemplanError(f"{path}: line {n}: not UTF-8 text") from None


def _until(f, size: int):
    """The lines of `f` that start within the next `size` bytes."""
    for line in f:
        if size <= 0:
            return
        size -= len(line)
        yield line


def _parquet_rows(p: Path, path: str, columns_for=None, part: tuple | None = None):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MemplanError("reading Parquet needs pyarrow: pip install 'memplan[data]'") from None
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends
        raise MemplanError(f"{path}: not a Parquet file: {str(e).splitlines()[0][:200]}") from None
    columns = None
    if columns_for is not None:
        first = next(pf.iter_batches(batch_size=1), None)
        if first is None:
            return
        wanted = columns_for(first.to_pylist()[0])
        names = set(pf.schema_arrow.names)
        columns = [c for c in wanted if c in names] if wanted is not None else None
    groups = range(part[0], part[1]) if part else None
    for batch in pf.iter_batches(batch_size=8192, columns=columns or None, row_groups=groups):
        yield from batch.to_pylist()


def detect_format(row, text_field: str | None) -> str:
    if not isinstance(row, dict):
        raise MemplanError(f"a dataset row must be an object, got {type(row).__name__}")
    if text_field and text_field in row:
        value = row[text_field]
        return "chat" if isinstance(value, list) else "text"
    if isinstance(row.get("messages"), list) or isinstance(row.get("conversations"), list):
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if isinstance(row.get("text"), str):
        return "text"
    raise MemplanError(f"which column holds the text? the rows have {', '.join(map(str, row))}; give --text-field")


# ------------------------------------------------------------------------------------------------ lengths

@dataclass
class Lengths:
    lengths: array  # tokens per row, in file order
    format: str
    seconds: float
    rows_skipped: int = 0  # rows with no text
    counted_by: str = ""  # how the tokens were counted (tokencount.TokenCounter)


FORMAT_NAMES = ("chat", "text", "alpaca", "prompt_completion")


def token_lengths(path: str, tokenizer: Tokenizer, text_field: str | None = None, fmt: str | None = None,
                  chat_template: str | None = None, workers: int | None = None) -> Lengths:
    """Tokens per row of the dataset file, streamed and counted in batches by tokencount.TokenCounter (the
    tokenizer's own counts; should a checked batch disagree, the file is counted again by the tokenizer). A large
    JSONL or Parquet file is read by one process per core (split.py; `workers` sets how many, whatever the file's
    size)."""
    from memplan.integrations import split
    from memplan.integrations.chat import SkeletonMismatch
    from memplan.integrations.tokencount import Mismatch

    t0 = time.perf_counter()
    parts = split.ranges(path, workers, 0 if workers else split.MIN_BYTES)
    if parts:  # every process reads its rows as the first row says (as one process would)
        first = next(iter_rows(path), None)
        if fmt not in FORMAT_NAMES and first is not None:
            fmt = detect_format(first, text_field)
    fast, why_slow, skeletons = True, "", True
    for _ in range(3):  # at most: as planned, then without the skeletons, then without the piece count
        args = (path, tokenizer, text_field, fmt, chat_template, fast, why_slow, skeletons)
        try:
            results = split.run(_count_part, parts, *args) if parts else [_count_part(None, *args)]
            break
        except Mismatch as e:
            fast, why_slow = False, f"the piece count disagreed with the tokenizer on {e}"
        except SkeletonMismatch:
            skeletons = False
    out = array("I")
    for lengths, _, _, _, _ in results:
        out.extend(lengths)
    skipped = sum(r[2] for r in results)
    fmt = results[0][1]
    why = next((r[3] for r in results if r[3] is not None), None)
    if not out:
        raise MemplanError(f"--dataset {path!r}: no rows with text" + (f" ({skipped} rows without it)" if skipped
                                                                       else ""))
    how = (f"pieces of the {results[0][4]}, memoized, checked against the tokenizer" if why is None else
           f"the tokenizer (encode_batch_fast){': ' + why if why else ''}")
    if parts:
        how += f"; {len(parts)} processes"
    return Lengths(out, fmt or "text", time.perf_counter() - t0, skipped, how)


def _count_part(part, path, tokenizer, text_field, fmt, chat_template, fast, why_slow, skeletons):
    """One process's share: (lengths, format, rows skipped, None if counted by pieces else why not, the kind of
    tokenizer the pieces are of)."""
    from memplan.integrations.tokencount import TokenCounter

    counter = TokenCounter(tokenizer.tok)
    if not fast:
        counter.fast, counter.why_slow = False, why_slow
    out, fmt, skipped = _count(path, tokenizer, counter, text_field, fmt, chat_template, skeletons, part)
    return out, fmt, skipped, None if counter.fast else counter.why_slow, counter.kind


def _columns(fmt: str, row: dict, text_field: str | None) -> list[str]:
    """The columns a row's text comes from (Parquet reads only these)."""
    if text_field and text_field in row:
        return [text_field]
    return {"chat": ["messages", "conversations"], "alpaca": ["instruction", "input", "output"],
            "prompt_completion": ["prompt", "completion"]}.get(fmt, [text_field or "text"])


def _count(path: str, tokenizer: Tokenizer, counter, text_field, fmt, chat_template, skeletons: bool,
           part: tuple | None = None):
    from memplan.integrations.chat import Chat, SkeletonMismatch

    out = array("I")
    skipped = 0
    texts: list[str] = []
    completions: list[str] = []  # prompt/completion: the completion's tokens, added to the prompt's
    chat = None

    def pick(row):
        nonlocal fmt
        fmt = fmt if fmt in FORMAT_NAMES else detect_format(row, text_field)
        return _columns(fmt, row, text_field) if isinstance(row, dict) else None

    def flush(special: bool):
        if not texts:
            return
        counts = counter.count(texts, special)
        if completions:
            out.extend(n + x for n, x in zip(counts, counter.count(completions, False)))
        else:
            out.extend(counts)
        texts.clear()
        completions.clear()

    first = True
    rows_before = part[2] if part else 0  # for the row numbers of errors (a blank JSONL line counts as a row here)
    for row in iter_rows(path, pick, part):
        if first:
            if fmt not in FORMAT_NAMES:
                pick(row)
            if fmt == "chat":
                source = chat_template or tokenizer.chat_template
                if not source:
                    raise MemplanError(f"the rows are chats but {tokenizer.path} has no chat_template (and the "
                                       "config names none); give a tokenizer folder with tokenizer_config.json")
                chat = Chat(source, tokenizer.special, skeletons)
            first = False
        if not isinstance(row, dict):
            raise MemplanError(f"{path}: a row must be an object, got {type(row).__name__}")
        if fmt == "chat":
            value = row.get(text_field) if text_field and text_field in row else (
                row.get("messages") if "messages" in row else row.get("conversations"))
            if not isinstance(value, list):
                skipped += 1
                continue
            try:
                texts.append(chat(value))
            except (MemplanError, SkeletonMismatch):
                raise
            except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in templates
                raise MemplanError(f"{path}: the chat template failed on row "
                                   f"{rows_before + len(out) + len(texts) + skipped + 1}: "
                                   f"{str(e)[:200]}") from None
        elif fmt == "text":
            value = row.get(text_field or "text")
            if not isinstance(value, str):
                skipped += 1
                continue
            texts.append(value)
        elif fmt == "alpaca":
            inp = row.get("input") or ""
            texts.append(ALPACA.format(ctx=", paired with an input that provides further context" if inp else "",
                                       instruction=row.get("instruction") or "",
                                       input=f"### Input:\n{inp}\n\n" if inp else "", output=row.get("output") or ""))
        else:  # prompt / completion: two texts, the completion without special tokens (TRL tokenizes them apart)
            texts.append(str(row.get("prompt") or ""))
            completions.append(str(row.get("completion") or ""))
        if len(texts) >= CHUNK:
            flush(fmt != "chat")
    flush(fmt != "chat")
    return out, fmt, skipped


# -------------------------------------------------------------------------------------------- the commands

def add_flags(parser) -> None:
    g = parser.add_argument_group("dataset (plan for the real step shapes of a training set)")
    g.add_argument("--dataset", metavar="FILE", help="training data: .jsonl, .json, .csv or .parquet; the peak step "
                   "is planned from its token lengths (--seq-len, or the config's, is the maximum length)")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, a folder holding it, or a cached hub id "
                   "(default: the --from config's model, or the model's folder)")
    g.add_argument("--text-field", metavar="NAME", help="the column holding the text or the chat messages "
                   "(default: the config's, else detected: messages, conversations, prompt/completion, alpaca, text)")
    g.add_argument("--order", choices=ORDERS, help="the sampler's order (default: the config's, else shuffled)")
    g.add_argument("--packing", metavar="on|off", help="pack rows into sequences of the maximum length (default: "
                   "the config's, else off)")
    g.add_argument("--dataset-seed", type=int, default=42, metavar="N", help="seed of the simulated shuffle "
                   "(default: 42)")


def from_args(args, model, spec, budget_bytes: int | None = None, overheads=None):
    """(DatasetPlan, TrainSpec of the peak step) for --dataset, or (None, spec) without it."""
    if not getattr(args, "dataset", None):
        for flag in ("tokenizer", "text_field", "order", "packing"):
            if getattr(args, flag, None) is not None:
                raise MemplanError(f"--{flag.replace('_', '-')} needs --dataset FILE")
        return None, spec
    from memplan.options import _bool, from_config

    mapping = from_config(args)
    hints = dict(mapping.data) if mapping is not None else {}
    ref = args.tokenizer or hints.get("tokenizer") or _model_folder(model)
    if not ref:
        raise MemplanError("--dataset needs --tokenizer PATH (a tokenizer.json, its folder or a cached hub id)")
    try:
        tokenizer = load_tokenizer(ref)
    except MemplanError as e:
        if args.tokenizer:
            raise
        if _model_folder(model):
            tokenizer = load_tokenizer(_model_folder(model))
        else:
            raise MemplanError(f"--dataset needs a tokenizer: {ref!r} (from {mapping.path if mapping else 'the model'}) "
                               f"is not usable ({str(e).split(': ', 1)[-1]}); give --tokenizer PATH") from None
    packing = _bool(args.packing) if args.packing is not None else bool(hints.get("packing"))
    fmt = None if args.text_field else hints.get("format")
    lengths = token_lengths(args.dataset, tokenizer, args.text_field or hints.get("text_field"), fmt,
                            hints.get("chat_template"))
    given_seq = getattr(args, "seq_len", None) is not None
    too_long = hints.get("too_long", "truncate") if not given_seq else "truncate"
    result, peak = plan(model, spec, lengths, path=args.dataset, tokenizer=tokenizer.path, packing=packing,
                        order=args.order or hints.get("order") or "shuffled", too_long=too_long,
                        pad_to_max=bool(hints.get("pad_to_max")) and not given_seq,
                        pad_to_multiple_of=hints.get("pad_to_multiple_of"), budget_bytes=budget_bytes,
                        overheads=overheads, seed=args.dataset_seed)
    if result.peak_seq_len < spec.seq_len and not packing:
        result.notes.append(f"the longest step is {result.peak_seq_len:,} tokens, under the maximum length "
                            f"{spec.seq_len:,}: the estimate above is for the peak step")
    return result, peak


def _model_folder(model) -> str | None:
    src = Path(getattr(model, "source", "") or "")
    folder = src.parent if src.name == "config.json" else src
    return str(folder) if folder.is_dir() and (folder / "tokenizer.json").is_file() else None


def print_plan(p: DatasetPlan, out=None) -> None:
    import sys

    out = out or sys.stdout
    gib = 2**30
    pct = " · ".join(f"{k} {v:,}" for k, v in p.percentiles.items())
    print(f"dataset {p.path}: {p.rows:,} rows ({p.format}), tokens per row {pct} (mean {p.mean:,}); "
          f"tokenized in {p.read_seconds:.1f} s with {p.tokenizer}" + (f" ({p.counted_by})" if p.counted_by else ""),
          file=out)
    cut = []
    if p.truncated_rows:
        cut.append(f"{p.truncated_rows:,} rows ({p.truncated_rows / p.rows:.1%}) truncated at {p.max_length:,}, "
                   f"{p.truncated_tokens:,} tokens lost")
    if p.dropped_rows:
        cut.append(f"{p.dropped_rows:,} rows ({p.dropped_rows / p.rows:.1%}) longer than {p.max_length:,} dropped "
                   "(axolotl's excess_length_strategy: drop)")
    if cut:
        print("  " + "; ".join(cut), file=out)
    shape = (f"packed into sequences of {p.max_length:,} tokens" if p.packing else
             f"padded to the longest row of each batch, {p.order} order")
    waste = 1 - p.total_tokens / p.padded_tokens if p.padded_tokens else 0
    print(f"  {p.steps:,} steps of {p.batch_size} rows, {shape}; padding {waste:.1%} of the tokens computed", file=out)
    print(f"  peak: step {p.peak_step:,} ({p.peak_rows} × {p.peak_seq_len:,} tokens): tensor peak "
          f"{p.peak_bytes / gib:,.2f} GiB, device total {p.peak_device_total_bytes / gib:,.2f} GiB", file=out)
    if p.budget_bytes is not None:
        if p.steps_over_budget:
            print(f"  over the budget of {p.budget_bytes / gib:,.2f} GiB: {p.steps_over_budget:,} of {p.steps:,} "
                  f"steps ({p.steps_over_budget / p.steps:.1%}); the first is step {p.first_step_over_budget:,}",
                  file=out)
        else:
            print(f"  every step fits the budget of {p.budget_bytes / gib:,.2f} GiB", file=out)
    longest = ", ".join(f"{s:,}×{c:,}" for s, c in p.seq_len_histogram[:5])
    print(f"  longest step lengths (tokens × steps): {longest}", file=out)
    for n in p.notes:
        print(f"  note: {n}", file=out)


def print_cutoff(cut: dict | None, p: DatasetPlan, out=None) -> None:
    import sys

    out = out or sys.stdout
    if cut is None:
        print(f"  no maximum length fits at batch {p.batch_size} (not even 64 tokens)", file=out)
    elif cut.get("note"):
        print(f"  largest maximum length that fits at batch {p.batch_size}: {cut['max_length']:,} ({cut['note']})",
              file=out)
    else:
        print(f"  largest maximum length that fits at batch {p.batch_size}: {cut['max_length']:,} tokens: truncates "
              f"{cut['truncated_rows']:,} rows ({cut['truncated_share']:.1%}), {cut['tokens_lost_share']:.1%} of the "
              "tokens", file=out)
