"""Fuzzing the estimate CLI and the config loader (hypothesis): whatever the input, either a finite, consistent
answer or one error line and exit status 2 — never a traceback."""
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memplan.cli import main

MODELS = ["llama-2-7b", "mixtral-8x7b", "qwen2.5-0.5b", "falcon-7b", "opt-6.7b", "gemma-2-9b", "phi-3-mini",
          "qwen3-30b-a3b", "gpt-neox-20b", "llama-3.1-405b"]
NUMBERS = st.one_of(st.integers(-5, 10**13).map(str), st.sampled_from(["0", "-1", "1e3", "abc", "", "1,2", ",", "nan",
                                                                        "10**6", "4,4", " 8 "]))
FLAG_VALUES = {
    "--bits": st.one_of(st.sampled_from(["4", "8", "16", "32", "3", "4,16", "x"]), NUMBERS),
    "--seq-len": NUMBERS, "--batch-size": NUMBERS, "--lora-r": NUMBERS, "--lora-alpha": NUMBERS,
    "--lora-dropout": st.sampled_from(["0", "0.05", "0.99", "1", "-0.1", "nan", "x"]),
    "--lora-targets": st.sampled_from(["qv", "attn", "all-linear", "q_proj+v_proj", "wq", "", "+", "gate_proj"]),
    "--optimizer": st.sampled_from(["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "adafactor", "lion"]),
    "--checkpointing": st.sampled_from(["on", "off", "on,off", "maybe"]),
    "--attention": st.sampled_from(["sdpa", "eager", "flash"]),
    "--method": st.sampled_from(["lora", "full", "lora,full", "qlora"]),
    "--quant-type": st.sampled_from(["nf4", "fp4", "int4"]),
    "--compute-dtype": st.sampled_from(["bf16", "fp16", "fp32", "fp8"]),
    "--double-quant": st.sampled_from(["on", "off", "2"]),
    "--upcast": st.sampled_from(["on", "off"]),
    "--dora": st.sampled_from(["on", "off"]),
    "--modules-to-save": st.sampled_from(["lm_head", "embed_tokens", "lm_head+embed_tokens", "none", "mlp"]),
    "--gpu": st.sampled_from(["rtx-4090", "h100-sxm", "a100", "tpu"]),
}


def invoke(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def check(code, out, err):
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], err
        return None
    data = json.loads(out)
    for d in data if isinstance(data, list) else [data]:
        values = [*d["components"].values(), *d["phases"].values(), d["peak_bytes"], d["device_total_bytes"]]
        assert all(isinstance(v, int) and v >= 0 and math.isfinite(v) for v in values), d
        assert sum(d["components"].values()) == d["peak_bytes"] <= d["device_total_bytes"]
    return data


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(MODELS + ["lama", "", "org/x", "/nonexistent/config.json"]),
       flags=st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.none(), max_size=5).flatmap(
           lambda keys: st.fixed_dictionaries({k: FLAG_VALUES[k] for k in keys})))
def test_fuzz_estimate_flags(model, flags):
    argv = ["estimate", model, "--json"]
    for k, v in flags.items():
        argv += [f"{k}={v}"]
    check(*invoke(argv))


FIELDS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings", "num_local_experts",
          "num_experts_per_tok", "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
          "ffn_dim", "max_position_embeddings", "mlp_only_layers", "decoder_sparse_step", "new_decoder_architecture"]
VALUES = st.one_of(st.integers(-3, 10**7), st.sampled_from([0, 1, 2, 64, 4096, 10**12]), st.booleans(), st.none(),
                   st.text(max_size=4), st.lists(st.integers(0, 4), max_size=3), st.floats(allow_nan=True))
TYPES = st.sampled_from(["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                         "gemma2", "phi3", "falcon", "gpt_neox", "opt", "not_a_model", 7])  # derived types: test_derive.py


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=12), model_type=TYPES,
       truncate=st.one_of(st.none(), st.integers(0, 200)))
def test_fuzz_config_files(tmp_path_factory, cfg, model_type, truncate):
    cfg = {**cfg, "model_type": model_type}
    text = json.dumps(cfg)
    if truncate is not None:
        text = text[:truncate]
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(text)
    check(*invoke(["estimate", str(path), "--json", "--seq-len", "128"]))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(layers=st.integers(1, 10**4), hidden=st.sampled_from([64, 8192, 65536, 2**20]), seq=st.integers(1, 10**6),
       batch=st.integers(1, 4096))
def test_absurd_but_valid_sizes_stay_finite(tmp_path_factory, layers, hidden, seq, batch):
    """10^12-parameter models, million-token contexts: exact integers, no overflow."""
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
           "num_attention_heads": max(1, hidden // 128), "vocab_size": 256000}
    path = tmp_path_factory.mktemp("big") / "config.json"
    path.write_text(json.dumps(cfg))
    code, out, err = invoke(["estimate", str(path), "--json", "--seq-len", str(seq), "--batch-size", str(batch)])
    assert code == 0, err
    d = check(code, out, err)
    assert d["peak_bytes"] > d["params"]["total"] // 2  # at least the packed 4-bit weights
