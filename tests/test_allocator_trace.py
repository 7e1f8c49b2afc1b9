"""The trace's allocation stream and `memplan trace --allocator` (tiny models built from configs the tests write)."""
from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from memplan.allocator import ALLOC, FREE, parse_alloc_conf, replay  # noqa: E402
from memplan.allocator.device import device_replay  # noqa: E402
from memplan.architectures import from_hf_config  # noqa: E402
from memplan.estimate.overhead import default_overheads  # noqa: E402
from memplan.spec import TrainSpec  # noqa: E402
from memplan.trace import run_trace  # noqa: E402

logging.disable(logging.WARNING)

TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4000, "max_position_embeddings": 512,
        "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def traced():
    return run_trace(from_hf_config(TINY, "tiny", "test"), TrainSpec(seq_len=256, batch_size=2),
                     record_allocations=True)


def test_stream_reproduces_the_trace_live_bytes(traced):
    # the stream is the tracker's own bookkeeping: replayed, its live tensor bytes peak where the trace's do
    live, cur, peak = {}, 0, 0
    for op, handle, nbytes, stream, phase, label in traced.allocations:
        assert stream == 0 and phase in ("load", "forward", "backward", "optimizer")
        if op == ALLOC:
            assert handle not in live
            live[handle] = nbytes
            cur += nbytes
        else:
            assert op == FREE
            cur -= live.pop(handle)
        peak = max(peak, cur)
    assert peak == traced.peak_bytes
    r = replay(traced.allocations)
    assert r.peak_requested_bytes == traced.peak_bytes
    assert r.peak_reserved_bytes >= r.peak_allocated_bytes >= traced.peak_bytes


def test_device_replay_adds_context_and_keeps_workspace_inside(traced):
    ov = default_overheads()
    d = device_replay(traced.allocations, parse_alloc_conf(""))
    assert d.replay.peak_requested_bytes == traced.peak_bytes + ov.cublas_workspace  # allocated at the 1st matmul
    assert d.device_total_bytes == d.replay.peak_reserved_bytes + ov.cuda_context
    e = device_replay(traced.allocations, parse_alloc_conf("expandable_segments:True"))
    assert e.replay.peak_requested_bytes == d.replay.peak_requested_bytes


def test_budget_oom_names_the_phase(traced):
    d = device_replay(traced.allocations, parse_alloc_conf(""),
                      gpu_bytes=default_overheads().cuda_context + 40 * 2**20)
    assert d.replay.oom is not None and d.replay.oom.phase in ("load", "forward", "backward", "optimizer")
    assert d.replay.oom.reserved_bytes <= 40 * 2**20


def test_cli_trace_allocator(tmp_path, capsys):
    from memplan.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    csv_path = tmp_path / "alloc.csv"
    assert main(["trace", str(cfg), "-s", "64", "--allocator", "--alloc-conf", "expandable_segments:True",
                 "--budget", "8GiB", "--alloc-csv", str(csv_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    a = out["allocator"]
    assert a["expandable_segments"] and a["oom"] is None and a["budget_bytes"] == 8 * 2**30
    assert out["device_total_bytes"] == a["peak_reserved_bytes"] + a["cuda_context_bytes"]
    assert csv_path.read_text().startswith("event,phase,requested_bytes,allocated_bytes,reserved_bytes")


@pytest.mark.parametrize("argv, needle", [
    (["--allocator", "--alloc-conf", "max_split_size_mb:1"], "max_split_size_mb too small"),
    (["--alloc-conf", "expandable_segments:True"], "go with --allocator"),
    (["--allocator", "--alloc-csv", "/"], "is a directory"),
    (["--allocator", "--alloc-conf", "per_process_memory_fraction:0.5"], "give --gpu or --budget"),
])
def test_cli_trace_allocator_bad_input(tmp_path, capsys, argv, needle):
    from memplan.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    assert main(["trace", str(cfg), "-s", "32", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
