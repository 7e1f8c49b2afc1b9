"""Multi-GPU per-rank memory (#13): flags and their one-line errors, the per-rank estimate, DeepSpeed's own
model-state estimators, the planning commands, and the rank trace on a fake process group."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memplan.catalog import resolve_model
from memplan.errors import MemplanError
from memplan.estimate import estimate
from memplan.spec import TrainSpec

GIB = 2**30
STATES = ("weights_quantized", "quant_state", "weights_unquantized", "lora", "gradients", "optimizer_states")


def _model_states(e) -> int:
    """Model states on the GPU after the optimizer step: weights, trainable copies, gradients, optimizer states."""
    c = e.phase_components["optimizer"]
    return sum(c[k] for k in STATES)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=0), "gpus must be a positive integer"),
    (dict(gpus=1, parallel="ddp"), "shards nothing"),
    (dict(gpus=1, parallel="zero2"), "shards nothing"),
    (dict(gpus=2, parallel="none"), "needs a strategy"),
    (dict(gpus=2, parallel="fsdp", fsdp_version=1, quant_storage="uint8"), "FlatParameter"),
    (dict(gpus=2, parallel="zero3", quant_storage="uint8"), "ZeRO-3"),
    (dict(gpus=2, bits=8, parallel="fsdp"), "LLM.int8"),
    (dict(gpus=2, parallel="fsdp", offload="optimizer"), "use --offload params"),
    (dict(gpus=2, parallel="zero2", offload="params"), "sharded parameters"),
    (dict(gpus=2, parallel="mp"), "unsupported parallel"),
])
def test_bad_combinations_are_one_line_errors(kwargs, message):
    with pytest.raises(MemplanError, match=message):
        TrainSpec(**kwargs)


def test_cli_gpus_zero_exits_2_with_one_line():
    p = subprocess.run([sys.executable, "-m", "memplan", "estimate", "llama-3-8b", "--gpus", "0"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "gpus must be a positive integer" in p.stderr


def test_auto_strategy_and_storage():
    assert TrainSpec().strategy == "none" and TrainSpec().storage == "uint8"
    t = TrainSpec(gpus=4)
    assert t.strategy == "fsdp" and t.storage == "bf16"  # PEFT's FSDP-QLoRA guide: quant storage = compute dtype
    assert TrainSpec(gpus=4, parallel="ddp").storage == "uint8"


@pytest.mark.parametrize("gpus", [2, 4, 8])
@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_zero2_model_states_equal_deepspeed_estimator(gpus, offload):
    """Full fine-tuning in bf16 (what DeepSpeed's estimator assumes: every parameter trainable, mixed-precision
    Adam): memplan's per-rank model states equal estimate_zero2_model_states_mem_needs to the padding byte."""
    zero = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    model = resolve_model("llama-3.2-1b")
    t = TrainSpec(bits=16, method="full", gpus=gpus, parallel="zero2", offload=offload)
    e = estimate(model, t)
    cpu, gpu = zero.estimate_zero2_model_states_mem_needs(model.total_params, num_gpus_per_node=gpus,
                                                           cpu_offload=offload != "none")
    assert _model_states(e) == pytest.approx(gpu, rel=1e-6, abs=64)
    if offload != "none":  # theirs adds a 1.5x buffer factor (and max(4N, 16) B/param) to the host side
        assert e.host_bytes <= cpu <= 1.5 * max(4 * gpus, 16) / 16 * e.host_bytes


@pytest.mark.parametrize("gpus", [2, 4, 8])
@pytest.mark.parametrize("offload", ["none", "optimizer", "params"])
def test_zero3_model_states_equal_deepspeed_estimator(gpus, offload):
    """estimate_zero3_model_states_mem_needs: 18 B/param / N on the GPU (+ 4 B x the largest layer gathered,
    which memplan counts as comm_buffers, not model states). memplan keeps parameters under
    stage3_param_persistence_threshold (1e5 elements: the norms) whole on every rank, which theirs ignores."""
    zero = pytest.importorskip("deepspeed.runtime.zero.stage3")
    model = resolve_model("llama-3.2-1b")
    t = TrainSpec(bits=16, method="full", gpus=gpus, parallel="zero3", offload=offload)
    e = estimate(model, t)
    cpu, gpu, largest = zero.estimate_zero3_model_states_mem_needs(
        model.total_params, model.hidden_size * model.vocab_size, num_gpus_per_node=gpus,
        cpu_offload=offload != "none", cpu_offload_params=offload == "params")
    norms = sum(n * layer.norm_params for n, layer in model.layers) + model.hidden_size
    persistent = 2 * norms * (gpus - 1) // gpus  # the 16-bit norms, whole instead of sharded
    assert _model_states(e) == pytest.approx(gpu - largest + (persistent if offload != "params" else 0),
                                             rel=1e-4, abs=4096)


def test_memplan_differs_from_deepspeed_where_it_should():
    """QLoRA under ZeRO-3: DeepSpeed's estimator counts every parameter as trained in mixed precision (18 B);
    memplan counts the frozen 4-bit base at ~0.5 B/param sharded, and 18 B only for the adapters."""
    zero = pytest.importorskip("deepspeed.runtime.zero.stage3")
    model = resolve_model("llama-2-70b")
    e = estimate(model, TrainSpec(gpus=8, parallel="zero3"))
    _, gpu, largest = zero.estimate_zero3_model_states_mem_needs(model.total_params, 0, num_gpus_per_node=8,
                                                                  cpu_offload=False)
    assert _model_states(e) < 0.06 * gpu  # ~4.6 GiB vs DeepSpeed's ~145 GiB


def test_fsdp_shards_what_it_should():
    model = resolve_model("llama-2-70b")
    one = estimate(model, TrainSpec())
    for n in (2, 4, 8):
        e = estimate(model, TrainSpec(gpus=n))
        c1, cn = one.phase_components["optimizer"], e.phase_components["optimizer"]
        # 4-bit weights (bf16 storage) shard to 1/N, up to per-tensor padding; the quant state stays whole
        assert cn["weights_quantized"] == pytest.approx(c1["weights_quantized"] / n, rel=1e-3)
        assert cn["quant_state"] == c1["quant_state"]
        assert cn["optimizer_states"] == pytest.approx(c1["optimizer_states"] / n, rel=1e-3)
        assert e.components["comm_buffers"] > 0
        assert e.device_overheads["nccl_buffers"] > 0
        assert e.parallel["gpus"] == n and e.parallel["comm_bytes_per_step"] > 0
    # uint8 storage under FSDP2: accelerate leaves 4-bit weights out of sharding
    u = estimate(model, TrainSpec(gpus=4, quant_storage="uint8"))
    assert u.phase_components["optimizer"]["weights_quantized"] == one.phase_components["optimizer"]["weights_quantized"]
    assert any("ignored_params" in n for n in u.notes)


def test_ddp_keeps_a_second_copy_of_gradients_in_buckets():
    model = resolve_model("llama-3-8b")
    one = estimate(model, TrainSpec())
    ddp = estimate(model, TrainSpec(gpus=2, parallel="ddp"))
    trainable_bytes = one.phase_components["optimizer"]["gradients"]
    assert ddp.components["comm_buffers"] == trainable_bytes
    assert ddp.peak_bytes == one.peak_bytes + trainable_bytes or ddp.peak_bytes > one.peak_bytes


def test_offload_moves_bytes_to_host():
    model = resolve_model("llama-3-8b")
    on = estimate(model, TrainSpec(bits=16, method="full", gpus=2, parallel="zero3"))
    off = estimate(model, TrainSpec(bits=16, method="full", gpus=2, parallel="zero3", offload="optimizer"))
    assert off.host_bytes > 0 and on.host_bytes == 0
    moved = on.phase_components["optimizer"]["optimizer_states"] - off.phase_components["optimizer"]["optimizer_states"]
    assert off.host_bytes == pytest.approx(2 * moved, rel=1e-3)  # both ranks' shards on one node


def test_gpus_command_plans_counts_fast():
    import time

    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "memplan", "gpus", "llama-2-70b", "--max-gpus", "8", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    plan = {r["gpu"]: r for r in json.loads(p.stdout)["multi_gpu"]}
    assert plan["h100-sxm"]["gpus"] == 1 and plan["h100-sxm"]["parallel"] == "none"
    assert plan["rtx-4090"]["gpus"] in (2, 4) and plan["rtx-4090"]["parallel"] in ("fsdp", "zero3")
    assert plan["rtx-4090"]["device_total_bytes"] <= 24564 * 2**20
    assert time.perf_counter() - t0 < 10  # the 0.5 s budget is measured in README, not timed here


def test_fit_offers_sharding_and_offload_with_costs():
    from memplan.plan import fit, make_budget

    f = fit(resolve_model("llama-2-70b"), TrainSpec(), make_budget(gpu="rtx-4090"))
    keys = {o.key: o for o in f.options}
    assert keys["shard-gpus"].fits and "GiB sent per GPU per step" in keys["shard-gpus"].cost
    assert "offload" in keys and "host RAM" in keys["offload"].cost


def test_sweep_writes_per_rank_columns(tmp_path):
    out = tmp_path / "s.csv"
    p = subprocess.run([sys.executable, "-m", "memplan", "sweep", "llama-3-8b", "--gpus", "1,2,4,8",
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["gpus"] for r in rows] == ["1", "2", "4", "8"]
    assert [r["strategy"] for r in rows] == ["none", "fsdp", "fsdp", "fsdp"]
    peaks = [int(r["peak_bytes"]) for r in rows]
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]


# ----------------------------------------------------------------- the rank trace on a fake process group

TINY_LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
              "max_position_embeddings": 512, "tie_word_embeddings": False}
TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500, "num_local_experts": 4,
                "num_experts_per_tok": 2}


@pytest.mark.parametrize("cfg, train", [
    (TINY_LLAMA, TrainSpec(seq_len=64, gpus=2)),
    (TINY_LLAMA, TrainSpec(seq_len=64, gpus=4, parallel="ddp", optimizer="sgd")),
    (TINY_MIXTRAL, TrainSpec(seq_len=32, gpus=4)),
    (TINY_MIXTRAL, TrainSpec(seq_len=32, gpus=8, bits=16, method="full", parallel="fsdp-grad-op")),
], ids=["llama-qlora-fsdp2", "llama-ddp4", "mixtral-qlora-fsdp4", "mixtral-full-gradop8"])
def test_rank_trace_meta_equals_real_cpu(cfg, train):
    """The meta rank trace (any size) counts exactly what the same rank's step allocates on real CPU tensors."""
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    import logging

    logging.disable(logging.WARNING)
    from memplan.architectures import from_hf_config
    from memplan.trace.distributed import run_rank_trace

    model = from_hf_config(cfg, "tiny", "test")
    real = run_rank_trace(model, train, real=True)
    meta = run_rank_trace(model, train, real=False)
    assert meta.phases == real.phases
    assert meta.components == real.components
    single = run_rank_trace(model, train.with_(gpus=1, parallel="auto", offload="none"), real=False)
    if train.strategy == "ddp":  # DDP's buckets: a second copy of every trainable gradient
        assert meta.components["comm_buffers"] == single.components["lora"]
    else:  # sharded: the rank's parameters shrink
        assert meta.phases["load"] < single.phases["load"]


def test_untraceable_strategies_say_why():
    from memplan.trace.distributed import traceable

    assert "DeepSpeed" in traceable(TrainSpec(gpus=2, parallel="zero3"))
    assert "FSDP1" in traceable(TrainSpec(gpus=2, fsdp_version=1))
    assert traceable(TrainSpec(gpus=2)) is None


DENSE_4L = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
            "max_position_embeddings": 1024, "tie_word_embeddings": False}


@pytest.mark.parametrize("parallel", ["fsdp", "fsdp-grad-op"])
@pytest.mark.parametrize("vocab, seq", [(512, 256), (8192, 512)], ids=["layers-bind", "loss-binds"])
def test_checkpointed_full_finetune_phases_equal_the_rank_trace(parallel, vocab, seq):
    """Checkpointed 16-bit full fine-tuning under FSDP2 on 4 fake ranks, estimate vs the meta rank trace, phase by
    phase. layers-bind: the backward peak is a layer's backward, which holds its own unsharded weight gradients,
    the reduce-scatter input of the unit after it and (SHARD_GRAD_OP) only the layers up to it unsharded, each
    later one resharded after its backward (parallel._fsdp_layer_moments; before: -2.6% FULL_SHARD, +9.9%
    SHARD_GRAD_OP); the forward peak is the last layer's copy-out, before the final norm ran. loss-binds: the
    final norm saves its fp32 input and normalized input and lm_head its input for the weight gradients, alive
    at the loss (activations._final_norm; before: -1.1..-1.3%)."""
    pytest.importorskip("torch")
    import logging

    logging.disable(logging.WARNING)
    from memplan.architectures import from_hf_config
    from memplan.trace.distributed import run_rank_trace

    model = from_hf_config({**DENSE_4L, "vocab_size": vocab}, "tiny", "test")
    train = TrainSpec(seq_len=seq, gpus=4, parallel=parallel, bits=16, method="full", optimizer="sgd",
                      gradient_checkpointing=True)
    traced = run_rank_trace(model, train).phases  # the second step: the optimizer states exist
    est = estimate(model, train).phases
    for phase in ("forward", "backward"):
        assert est[phase] == pytest.approx(traced[phase], rel=0.005), phase


@pytest.mark.parametrize("checkpointing", [True, False])
def test_fsdp_layer_backward_ends_at_its_input_norm(checkpointing):
    """FULL_SHARD full fine-tuning on 4 fake ranks, short sequences: the backward peaks at a layer's input norm,
    its last backward op, with every unsharded weight gradient of the layer made beside the norm's five fp32
    working tensors, its saved fp32 input and the residual's gradient (moments.input_norm_backward; before:
    -3.8% checkpointed, -3.5% not; Llama-2-70B x4 at seq 2048 -3.1%)."""
    pytest.importorskip("torch")
    import logging

    logging.disable(logging.WARNING)
    from memplan.architectures import from_hf_config
    from memplan.trace.distributed import run_rank_trace

    model = from_hf_config(DENSE_4L, "tiny", "test")
    train = TrainSpec(seq_len=64, gpus=4, parallel="fsdp", bits=16, method="full", optimizer="sgd",
                      gradient_checkpointing=checkpointing)
    traced = run_rank_trace(model, train)
    assert traced.peak_phase == "backward"
    assert estimate(model, train).phases["backward"] == pytest.approx(traced.phases["backward"], rel=0.002)
