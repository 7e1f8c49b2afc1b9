"""How long `--dataset` takes on a large file: write N rows (default 1,000,000) of chat JSONL and of text Parquet
(row groups of at most 100 MB, as `datasets` writes them) with a byte-level BPE tokenizer trained here
(`tokenizers`) in a temporary folder, then time the command a user
runs, `memplan estimate llama-3-8b --dataset FILE --tokenizer DIR --batch-size 4 --seq-len 2048 --gpu rtx-4090`,
end to end (a fresh process: imports, reading, chat template, token counts, steps, estimates), and each stage
in this process.

    python scripts/bench_dataset.py [--rows N] [--words MEAN] [--tokenizer byte-level|sentencepiece] [--keep DIR] [--no-stages]

Row lengths are log-normal (median ~MEAN words, a long tail), like instruction data. The target is 1 M rows in
<= 60 s on the development machine (2 CPU cores, shared: the load average is printed with each figure).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the model memory gpu train data token length batch step peak llama quant adapter loss context sequence "
         "attention layer weight gradient optimizer state checkpoint").split()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}")


def make(folder: Path, rows: int, words: int, shape: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if shape == "byte-level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:  # trained on words as SentencePiece is, then saved in Llama 2's tokenizer.json shape (LlamaConverter)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    tok.train_from_iterator([text(50) for _ in range(2000)],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    if shape == "byte-level":
        tok.save(str(folder / "tokenizer.json"))
    else:
        spec = json.loads(tok.to_str())
        for b in range(256):  # Llama 2's byte fallback tokens
            spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
        spec["model"]["byte_fallback"] = spec["model"]["fuse_unk"] = True
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        spec["pre_tokenizer"] = None
        (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "chat_template": TEMPLATE}))
    bodies = []
    with open(folder / "chat.jsonl", "w") as f:
        for _ in range(rows):
            k = max(1, int(rng.lognormvariate(0, 0.8) * words))
            body = text(k)
            bodies.append(body)
            f.write(json.dumps({"messages": [{"role": "user", "content": text(max(1, k // 4))},
                                             {"role": "assistant", "content": body}]}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    # row groups of at most 100 MB uncompressed, as `datasets` writes Parquet (datasets 5.2 arrow_writer.py
    # get_writer_batch_size_from_data_size)
    table = pa.table({"text": bodies})
    pq.write_table(table, folder / "text.parquet", row_group_size=max(1, int(table.num_rows * 100e6 / table.nbytes)))


def cli(folder: Path, name: str) -> None:
    """The user's command in a fresh process: wall seconds and CPU seconds (all its threads)."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "memplan", "estimate", "llama-3-8b", "--dataset", str(folder / name), "--tokenizer",
           str(folder), "--batch-size", "4", "--seq-len", "2048", "--gpu", "rtx-4090"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode:
        raise SystemExit(f"memplan failed: {r.stderr.strip()}")
    first = next((line for line in r.stdout.splitlines() if line.startswith("dataset ")), "")
    print(f"memplan estimate --dataset {name}: {wall:.1f} s wall, {cpu:.1f} s CPU (load average {load:.1f} before)")
    print(f"  {first}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--keep", help="write the files here (and reuse them if present); default: a temporary folder, "
                    "removed at the end")
    ap.add_argument("--tokenizer", choices=("byte-level", "sentencepiece"), default="byte-level",
                    help="byte-level BPE (GPT-2, Llama 3, Qwen) or SentencePiece-style BPE in Llama 2's tokenizer.json "
                    "shape (normalizer Prepend + Replace, byte fallback, no pre-tokenizer)")
    ap.add_argument("--no-stages", action="store_true", help="time only the command, not each stage")
    a = ap.parse_args()
    import importlib.metadata as md

    folder = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="memplan-bench-ds-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if not (folder / "text.parquet").is_file():
            t = time.perf_counter()
            make(folder, a.rows, a.words, a.tokenizer)
            print(f"wrote {a.rows:,} rows in {time.perf_counter() - t:.1f} s to {folder}")
        versions = ", ".join(f"{p} {_version(md, p)}" for p in ("tokenizers", "pyarrow", "jinja2", "numpy", "orjson",
                                                                "regex"))
        print(f"python {platform.python_version()}, {versions}; {os.cpu_count()} CPUs")
        for name in ("chat.jsonl", "text.parquet"):
            cli(folder, name)
        if not a.no_stages:
            stages(folder)
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def _version(md, name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "(not installed)"


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the reading processes of a large JSONL file)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def stages(folder: Path) -> None:
    from memplan.catalog import resolve_model
    from memplan.integrations import dataset as ds
    from memplan.spec import TrainSpec

    tok = ds.load_tokenizer(str(folder))
    model = resolve_model("llama-3-8b")
    for name in ("chat.jsonl", "text.parquet"):
        t, cpu = time.perf_counter(), _cpu()
        lengths = ds.token_lengths(str(folder / name), tok)
        t_len, cpu_len = time.perf_counter() - t, _cpu() - cpu
        t = time.perf_counter()
        p, _ = ds.plan(model, TrainSpec(batch_size=4, seq_len=2048), lengths, path=name, tokenizer="bench",
                       budget_bytes=24 * 2**30)
        t_plan = time.perf_counter() - t
        t = time.perf_counter()
        ds.plan(model, TrainSpec(batch_size=4, seq_len=2048), lengths, path=name, tokenizer="bench", packing=True)
        t_pack = time.perf_counter() - t
        n = len(lengths.lengths)
        print(f"{name}: {n:,} rows ({lengths.format}), p50 {p.percentiles['p50']} / max {p.percentiles['max']} tokens: "
              f"read + count {t_len:.1f} s wall, {cpu_len:.1f} s CPU ({n / t_len:,.0f} rows/s; counted by "
              f"{lengths.counted_by}), steps + estimates {t_plan:.2f} s, packing {t_pack:.2f} s; "
              f"{os.path.getsize(folder / name) / 2**20:,.0f} MiB file")


if __name__ == "__main__":
    sys.exit(main())
