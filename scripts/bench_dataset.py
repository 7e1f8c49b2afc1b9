"""How long `--dataset` takes on a large file: write N rows (default 1,000,000) of chat JSONL and of text Parquet
with a byte-level BPE tokenizer trained here (`tokenizers`), then time memplan's token lengths and step plan.

    python scripts/bench_dataset.py [--rows N] [--words MEAN] [--keep DIR]

Row lengths are log-normal (median ~MEAN words, a long tail), like instruction data. Prints seconds and rows/s per
stage; the target is 1 M rows in <= 60 s on the development machine (2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the model memory gpu train data token length batch step peak llama quant adapter loss context sequence "
         "attention layer weight gradient optimizer state checkpoint").split()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}")


def make(folder: Path, rows: int, words: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text(50) for _ in range(2000)],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(folder / "tokenizer.json"))
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

    pq.write_table(pa.table({"text": bodies}), folder / "text.parquet")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--keep", help="write the files here (and reuse them if present)")
    a = ap.parse_args()
    from memplan.catalog import resolve_model
    from memplan.integrations import dataset as ds
    from memplan.spec import TrainSpec

    folder = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="memplan-bench-ds-"))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "chat.jsonl").is_file():
        t = time.perf_counter()
        make(folder, a.rows, a.words)
        print(f"wrote {a.rows:,} rows in {time.perf_counter() - t:.1f} s to {folder}")
    tok = ds.load_tokenizer(str(folder))
    model = resolve_model("llama-3-8b")
    import importlib.metadata as md

    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(f"python {platform.python_version()}, tokenizers {md.version('tokenizers')}, pyarrow {md.version('pyarrow')}, "
          f"jinja2 {md.version('jinja2')}, numpy {md.version('numpy')}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    for name in ("chat.jsonl", "text.parquet"):
        t, cpu = time.perf_counter(), time.process_time()
        lengths = ds.token_lengths(str(folder / name), tok)
        t_len, cpu_len = time.perf_counter() - t, time.process_time() - cpu
        t = time.perf_counter()
        p, _ = ds.plan(model, TrainSpec(batch_size=4, seq_len=2048), lengths, path=name, tokenizer="bench",
                       budget_bytes=24 * 2**30)
        t_plan = time.perf_counter() - t
        t = time.perf_counter()
        ds.plan(model, TrainSpec(batch_size=4, seq_len=2048), lengths, path=name, tokenizer="bench", packing=True)
        t_pack = time.perf_counter() - t
        n = len(lengths.lengths)
        print(f"{name}: {n:,} rows ({lengths.format}), p50 {p.percentiles['p50']} / max {p.percentiles['max']} tokens: "
              f"tokenize {t_len:.1f} s wall, {cpu_len:.1f} s CPU over all threads ({n / t_len:,.0f} rows/s), "
              f"steps + estimates {t_plan:.2f} s, packing {t_pack:.2f} s; total {t_len + t_plan:.1f} s; "
              f"{os.path.getsize(folder / name) / 2**20:,.0f} MiB file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
