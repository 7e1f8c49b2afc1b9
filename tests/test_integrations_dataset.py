"""`--dataset FILE --tokenizer PATH`: token lengths equal what transformers' tokenizer builds (chat template
included), the per-step shapes are the trainer's, and the CLI answers for the dataset. The tokenizer is trained in
the test with `tokenizers`; the files are written here (JSONL, Parquet, CSV)."""
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from memplan.catalog import resolve_model
from memplan.cli import main
from memplan.integrations import dataset as ds
from memplan.spec import TrainSpec

WORDS = "the model memory gpu train data token length batch step peak llama quant adapter loss".split()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}")


def _text(rng, k):
    return " ".join(rng.choice(WORDS) for _ in range(k))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    root = tmp_path_factory.mktemp("ds")
    rng = random.Random(1)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_text(rng, 40) for _ in range(500)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "chat_template": TEMPLATE}))
    chats = []
    with open(root / "chat.jsonl", "w") as f:
        for _ in range(400):
            k = int(rng.lognormvariate(3.5, 0.9)) + 1
            row = {"messages": [{"role": "user", "content": _text(rng, max(1, k // 3))},
                                {"role": "assistant", "content": _text(rng, k)}]}
            chats.append(row["messages"])
            f.write(json.dumps(row) + "\n")
    texts = [_text(rng, int(rng.lognormvariate(3, 1)) + 1) for _ in range(300)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}), root / "text.parquet", row_group_size=64)
    (root / "text.csv").write_text("body,id\n" + "".join(f"\"{t}\",{i}\n" for i, t in enumerate(texts)))
    (root / "notes.txt").write_text("not a dataset\n")
    return {"root": root, "chats": chats, "texts": texts}


def hf_tokenizer(root):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                   chat_template=TEMPLATE)


def test_chat_lengths_equal_transformers_apply_chat_template(data):
    tok = ds.load_tokenizer(str(data["root"]))
    got = ds.token_lengths(str(data["root"] / "chat.jsonl"), tok)
    assert got.format == "chat"
    hf = hf_tokenizer(data["root"])
    want = [len(hf.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in data["chats"]]
    assert list(got.lengths) == want


@pytest.mark.parametrize("name", ["text.parquet", "text.csv"])
def test_text_lengths_equal_transformers(data, name):
    tok = ds.load_tokenizer(str(data["root"] / "tokenizer.json"))
    got = ds.token_lengths(str(data["root"] / name), tok, text_field="body")
    hf = hf_tokenizer(data["root"])
    assert list(got.lengths) == [len(hf(t)["input_ids"]) for t in data["texts"]]  # with the BOS it adds


def test_steps_pad_to_longest_truncate_and_order():
    rng = np.random.default_rng(0)
    lengths = ds.array("I", rng.integers(10, 3000, size=1001).tolist())
    lengths[500] = 9000
    st = ds.steps(lengths, 4, 2048, order="shuffled")
    assert len(st.seq) == 251 and st.rows.sum() == 1001 and st.rows[-1] == 1  # the last batch is short
    assert st.seq.max() == 2048 and st.truncated_rows == int((np.array(lengths) > 2048).sum())
    # each step is padded to its longest row: the shuffled order is a permutation of the rows
    assert st.padded_tokens >= st.total_tokens == int(np.minimum(np.array(lengths), 2048).sum())
    grouped = ds.steps(lengths, 4, 2048, order="group_by_length")
    assert grouped.seq[0] == 2048  # the longest batch first (get_length_grouped_indices)
    assert grouped.padded_tokens < st.padded_tokens  # grouping wastes less padding
    seq = ds.steps(lengths, 4, None, order="sequential")
    assert seq.seq[125] == 9000 and seq.truncated_rows == 0  # row 500 is in step 126, untruncated
    dropped = ds.steps(lengths, 4, 2048, too_long="drop")
    assert dropped.dropped_rows == st.truncated_rows and dropped.rows.sum() == 1001 - dropped.dropped_rows


def test_packing_is_best_fit_decreasing():
    rng = np.random.default_rng(3)
    n = rng.integers(1, 700, size=500)
    bins = ds._pack(np.sort(n)[::-1], 1024)
    # brute-force best-fit decreasing
    free = []
    for x in sorted(n.tolist(), reverse=True):
        fits = [i for i, f in enumerate(free) if f >= x]
        if fits:
            i = min(fits, key=lambda j: free[j])
            free[i] -= x
        else:
            free.append(1024 - x)
    assert bins == len(free) >= -(-int(n.sum()) // 1024)
    st = ds.steps(ds.array("I", n.tolist()), 3, 1024, packing=True)
    assert (st.seq == 1024).all() and st.rows.sum() == bins and len(st.rows) == -(-bins // 3)


def test_plan_peak_step_and_budget(data):
    model = resolve_model("llama-3.2-1b")
    tok = ds.load_tokenizer(str(data["root"]))
    lengths = ds.token_lengths(str(data["root"] / "chat.jsonl"), tok)
    spec = TrainSpec(batch_size=8, seq_len=4096)
    from memplan.estimate import estimate

    p0, _ = ds.plan(model, spec, lengths, path="x", tokenizer="t")
    longest = max(lengths.lengths)
    assert p0.peak_seq_len == longest and p0.peak_rows == 8
    assert p0.peak_device_total_bytes == estimate(model, spec.with_(seq_len=longest)).device_total_bytes
    # a budget between the median step and the peak step: some steps, not all, exceed it
    mid = estimate(model, spec.with_(seq_len=int(np.median(p0._steps_seq)))).device_total_bytes
    p, peak = ds.plan(model, spec, lengths, path="x", tokenizer="t", budget_bytes=(mid + p0.peak_device_total_bytes) // 2)
    assert 0 < p.steps_over_budget < p.steps and p.first_step_over_budget >= 1
    assert peak.seq_len == longest


def run(*argv):
    return subprocess.run([sys.executable, "-m", "memplan", *argv], capture_output=True, text=True, timeout=120)


def test_fit_for_the_dataset_json(data, capsys):
    from memplan.estimate import estimate

    root = data["root"]
    lengths = ds.token_lengths(str(root / "chat.jsonl"), ds.load_tokenizer(str(root))).lengths
    # a budget that holds a batch of 4 rows at the 90th-percentile length, not at the longest
    spec = TrainSpec(batch_size=4, seq_len=int(np.percentile(lengths, 90)), gradient_checkpointing=False)
    budget_mib = estimate(resolve_model("llama-3.2-1b"), spec).device_total_bytes // 2**20 + 1
    argv = ["fit", "llama-3.2-1b", "--budget", f"{budget_mib}MiB", "--margin", "0", "--dataset",
            str(root / "chat.jsonl"), "--tokenizer", str(root), "--batch-size", "4", "--seq-len", "8192",
            "--checkpointing", "off", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    dd = d["dataset"]
    assert dd["rows"] == 400 and dd["peak_seq_len"] == dd["percentiles"]["max"]
    assert d["config"]["seq_len"] == dd["peak_seq_len"]  # fit answers for the peak step
    cut = dd["largest_max_length"]
    assert spec.seq_len - 64 <= cut["max_length"] < dd["peak_seq_len"] and 0 < cut["truncated_rows"] < 400
    assert cut["truncated_rows"] == int((np.array(lengths) > cut["max_length"]).sum())
    assert 0 < dd["steps_over_budget"] < dd["steps"]


def test_estimate_with_config_hints_packing(data):
    root = data["root"]
    cfg = root / "axo.yml"
    cfg.write_text(f"base_model: llama-3.2-1b\nadapter: lora\nlora_target_linear: true\nbf16: true\n"
                   f"sequence_len: 512\nsample_packing: true\nmicro_batch_size: 2\n"
                   f"datasets:\n  - path: {root / 'chat.jsonl'}\n    type: chat_template\n")
    r = run("estimate", "--from", str(cfg), "--dataset", str(root / "chat.jsonl"), "--tokenizer", str(root))
    assert r.returncode == 0, r.stderr
    assert "packed into sequences of 512 tokens" in r.stdout and "2 × 512 tokens" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["--dataset", "{root}/nope.jsonl", "--tokenizer", "{root}"], ["no such file"]),
    (["--dataset", "{root}/notes.txt", "--tokenizer", "{root}"], ["unknown format", ".txt"]),
    (["--dataset", "{root}/chat.jsonl", "--tokenizer", "{root}/missing"], ["--tokenizer", "never downloads"]),
    (["--tokenizer", "{root}"], ["--tokenizer needs --dataset"]),
    (["--dataset", "{root}/text.parquet", "--tokenizer", "{root}"], ["--text-field"]),
])
def test_dataset_errors_one_line(data, args, words):
    root = str(data["root"])
    r = run("estimate", "llama-3.2-1b", *[a.format(root=root) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and all(w in line[0] for w in words), r.stderr


def test_dataset_path_imports_no_torch(data):
    root = str(data["root"])
    code = ("import sys, io, contextlib\nfrom memplan.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['estimate', 'llama-3.2-1b', '--dataset', {root + '/chat.jsonl'!r}, '--tokenizer', "
            f"{root!r}]) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---- tokencount: the piece count is the tokenizer's count, or the tokenizer counts

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
AWKWARD = ["I'LL say it's 12345 tokens\t\tthen  two spaces\n\n\nnewlines", "  lead and trail  ", "a\x1cb\x1fc \x0b d",
           "café naïve Ünïcödé 中文字符 😀 emoji", "e\u0301 (e + combining acute: NFC composes it)",
           "<|im_start|>user\nhi<|im_end|><|im_start|><|im_end|>", "", " ", "\n", "'''quotes''' \"and\" ---dashes--- 3.14159 1,000,000",
           "x" * 300, "tab\tmix \t \n end"]


def _trained(pre, normalizer=None, model="bpe"):
    from tokenizers import Tokenizer, models, trainers

    rng = random.Random(2)
    corpus = [_text(rng, 30) + " " + " ".join(AWKWARD) for _ in range(200)]
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"])
    else:
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"])
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_token_counter_equals_the_tokenizer_on_awkward_text():
    from tokenizers import Regex, normalizers, pre_tokenizers

    from memplan.integrations.tokencount import TokenCounter

    rng = random.Random(5)
    texts = AWKWARD + [_text(rng, rng.randint(0, 60)) + rng.choice(AWKWARD) for _ in range(300)]
    llama3 = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for tok in (_trained(llama3, normalizers.NFC()), _trained(pre_tokenizers.ByteLevel(add_prefix_space=False))):
        c = TokenCounter(tok)
        assert c.fast, c.why_slow
        want = [len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        fast = [c._pieces(t) for t in texts]
        # every text is counted by pieces (the regex module covers the non-ASCII ones), and each count is exact
        assert None not in fast and fast == want
        c.batches = 5  # not a checked batch: the piece count alone
        assert c.count(texts, True) == want


META = "\u2581"
SENTENCEPIECE_SHAPES = {  # tokenizer.json's normalizer and pre-tokenizer, as transformers' converters write them
    "llama-2 (legacy)": ({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": META}, {"type": "Replace", "pattern": {"String": " "}, "content": META}]}, None),
    "gemma": ({"type": "Replace", "pattern": {"String": " "}, "content": META},
              {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}),
    "llama non-legacy": (None, {"type": "Metaspace", "replacement": META, "prepend_scheme": "first", "split": False}),
    "metaspace always, split": (None, {"type": "Metaspace", "replacement": META, "prepend_scheme": "always",
                                       "split": True}),
    "metaspace never": (None, {"type": "Metaspace", "replacement": META, "prepend_scheme": "never", "split": False}),
}


def _sentencepiece_like(shape, merge=None):
    """A BPE trained on words as SentencePiece trains (Metaspace split), then written in `shape`: byte fallback,
    whitespace-run merges, the BOS post-processor, as Llama 2's and Gemma's tokenizer.json; `merge` adds one more."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(2)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    tok.train_from_iterator([_text(rng, 30) + " " + " ".join(AWKWARD) for _ in range(200)], trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]))
    spec = json.loads(tok.to_str())
    model, vocab = spec["model"], spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    for a, b in [(META, META), (META * 2, META * 2)] + ([merge] if merge else []):
        vocab.setdefault(a + b, len(vocab))
        model["merges"].append([a, b])
    model["byte_fallback"] = model["fuse_unk"] = True
    spec["normalizer"], spec["pre_tokenizer"] = SENTENCEPIECE_SHAPES[shape]
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                              {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}}}
    return Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize("shape", list(SENTENCEPIECE_SHAPES))
def test_token_counter_equals_sentencepiece_style_tokenizers(shape):
    """Llama 2 / Mistral / Gemma-shaped tokenizers (no regex; the BPE on the whole segment) are counted by pieces,
    exactly: prefix metaspace per segment between added tokens, whitespace runs, literal metaspaces, byte fallback."""
    from memplan.integrations.tokencount import TokenCounter

    tok = _sentencepiece_like(shape)
    c = TokenCounter(tok)
    assert c.fast and c.kind == "SentencePiece-style BPE", c.why_slow
    rng = random.Random(5)
    texts = AWKWARD + [f"{META}x {META}{META}y", "<s>hi", " <s> hi", "a<|im_end|> b", "   x  ", META, "é" * 40] + \
        [_text(rng, rng.randint(0, 60)) + rng.choice(AWKWARD) for _ in range(200)]
    for special in (False, True):
        want = [len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=special)]
        c.batches = 5  # not a checked batch: the piece count alone
        assert c.count(texts, special) == want


def test_sentencepiece_merge_across_a_metaspace_is_left_to_the_tokenizer():
    """A vocabulary with a token that has a character before a metaspace: pieces could be joined, so no piece
    count."""
    from memplan.integrations.tokencount import TokenCounter

    c = TokenCounter(_sentencepiece_like("llama-2 (legacy)", merge=("e", META)))
    assert not c.fast and "joins across a metaspace" in c.why_slow


def test_token_counter_falls_back_to_the_tokenizer(data, monkeypatch):
    from tokenizers import pre_tokenizers

    from memplan.integrations import tokencount

    wordpiece = _trained(pre_tokenizers.Whitespace(), model="wordpiece")
    c = tokencount.TokenCounter(wordpiece)
    assert not c.fast and "WordPiece" in c.why_slow
    assert c.count(AWKWARD, True) == [len(e.ids) for e in wordpiece.encode_batch_fast(AWKWARD)]
    # a wrong piece count on a checked batch: the file is counted again by the tokenizer, with the same lengths
    tok = ds.load_tokenizer(str(data["root"]))
    right = ds.token_lengths(str(data["root"] / "chat.jsonl"), tok)
    assert right.counted_by.startswith("pieces")
    monkeypatch.setattr(tokencount._Memo, "__missing__", lambda self, piece: (len(piece) << 32) + 1)
    again = ds.token_lengths(str(data["root"] / "chat.jsonl"), tok)
    assert list(again.lengths) == list(right.lengths) and "disagreed" in again.counted_by


# ---- chat: the template's text, from a skeleton per role sequence where the template only outputs the contents

QWEN25 = (  # Qwen2.5's chat template (tokenizer_config.json), the branches without tools
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == \"user\") or (message.role "
    "== \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}{{- "
    "'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- elif message.role == "
    "\"assistant\" %}{{- '<|im_start|>' + message.role }}{%- if message.content %}{{- '\\n' + message.content }}"
    "{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TRIM = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] | trim + '\\n' }}{% endfor %}")
TOJSON = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | tojson }}\n{% endfor %}"
CONCAT_THEN_FILTER = "{% for m in messages %}{{ ('[' + m['content']) | upper }}]{% endfor %}"


@pytest.mark.parametrize("template,skeleton", [(QWEN25, True), (TEMPLATE, True), (TRIM, False), (TOJSON, False),
                                               (CONCAT_THEN_FILTER, False)])
def test_chat_text_equals_apply_chat_template(data, template, skeleton):
    from transformers import PreTrainedTokenizerFast

    from memplan.integrations.chat import Chat

    hf = PreTrainedTokenizerFast(tokenizer_file=str(data["root"] / "tokenizer.json"), bos_token="<s>",
                                 eos_token="</s>", chat_template=template)
    rng = random.Random(7)
    odd = ["  padded  ", "{braces} {0} {{x}}", "\ue000 0 \ue001", "", "quote\" and\nnewline", "<|im_end|>"]
    rows = [[{"role": "system", "content": rng.choice(odd)}, {"role": "user", "content": _text(rng, 5)},
             {"role": "assistant", "content": rng.choice(odd) + _text(rng, 3)}] for _ in range(30)]
    rows += [[{"from": "human", "value": _text(rng, 4)}, {"from": "gpt", "value": rng.choice(odd)}] for _ in range(10)]
    rows += [[{"role": "user", "content": "hi", "name": "x"}]]  # a key beyond role/content: rendered in full
    chat = Chat(template, {"bos_token": "<s>", "eos_token": "</s>"})
    from memplan.integrations.chat import messages

    for row in rows:
        assert chat(row) == hf.apply_chat_template(messages(row), tokenize=False)
    assert all(v is not None for v in chat.skeletons.values()) is skeleton and chat.skeletons


def test_chat_skeleton_mismatch_reads_again(data, monkeypatch):
    from memplan.integrations import chat

    tok = ds.load_tokenizer(str(data["root"]))
    right = ds.token_lengths(str(data["root"] / "chat.jsonl"), tok)
    monkeypatch.setattr(chat.Chat, "_skeleton", lambda self, msgs: lambda value: "wrong")
    again = ds.token_lengths(str(data["root"] / "chat.jsonl"), tok)
    assert list(again.lengths) == list(right.lengths)


def test_jsonl_read_by_several_processes(data, tmp_path):
    """A JSONL file split into byte ranges, a Parquet file into runs of row groups (one process each), give the
    lengths in file order, and an error's line number is the file's."""
    tok = ds.load_tokenizer(str(data["root"]))
    one = ds.token_lengths(str(data["root"] / "chat.jsonl"), tok)
    three = ds.token_lengths(str(data["root"] / "chat.jsonl"), tok, workers=3)
    assert list(three.lengths) == list(one.lengths) and three.counted_by.endswith("3 processes")
    # Parquet by runs of row groups (the fixture's file has 5 groups of up to 64 rows)
    one = ds.token_lengths(str(data["root"] / "text.parquet"), tok, text_field="body")
    two = ds.token_lengths(str(data["root"] / "text.parquet"), tok, text_field="body", workers=2)
    assert list(two.lengths) == list(one.lengths) and two.counted_by.endswith("2 processes")
    lines = (data["root"] / "chat.jsonl").read_text().splitlines()
    lines[350] = lines[350][:-5]  # truncated JSON in the last third
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ds.MemplanError, match="line 351: malformed JSON"):
        ds.token_lengths(str(bad), tok, workers=3)


def test_token_counter_on_random_text():
    """Random strings over the characters that change a split (letters of several scripts, digits, apostrophes,
    punctuation, every kind of whitespace, combining marks, emoji, added tokens): the piece count is the
    tokenizer's, or None (then the tokenizer counts). Derandomized: the same examples every run."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from tokenizers import Regex, normalizers, pre_tokenizers

    from memplan.integrations.tokencount import TokenCounter

    llama3 = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    counters = [TokenCounter(t) for t in (_trained(llama3, normalizers.NFC()),
                                          _trained(pre_tokenizers.ByteLevel(add_prefix_space=False)),
                                          _sentencepiece_like("llama-2 (legacy)"),
                                          _sentencepiece_like("llama non-legacy"))]
    alphabet = st.sampled_from(list("aZé中ж7٣'sSdlLtT \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000.,!?-_\"()\u0301😀")
                               + ["<|im_start|>", "<|im_end|>", "'ll", "'RE", "123456", META, "  "])

    @settings(derandomize=True, max_examples=300, deadline=None)
    @given(st.lists(alphabet, max_size=40).map("".join))
    def check(text):
        for c in counters:
            got = c.pieces(text)
            assert got is None or got == len(c.tok.encode(text, add_special_tokens=False).ids), text

    check()
