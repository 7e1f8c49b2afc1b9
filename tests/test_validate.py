"""`memplan validate --against trace` on a small subset: the CSV, the cache, and the peak-error bar."""
from __future__ import annotations

import csv

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def test_validate_subset_writes_csv_and_caches(tmp_path, capsys):
    from memplan.cli import main

    out, cache = tmp_path / "v.csv", tmp_path / "cache"
    args = ["validate", "--against", "trace", "--models", "qwen2.5-0.5b", "--seq", "256", "--bits", "4,16",
            "--r", "16", "--checkpointing", "off", "--csv", str(out), "--cache", str(cache)]
    main(args)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2
    for row in rows:
        assert abs(float(row["peak_error"])) <= 0.03, row
        assert int(row["trace_peak_bytes"]) == sum(int(row[f"trace_{c}"]) for c in (
            "weights_quantized", "quant_state", "weights_unquantized", "lora", "gradients", "optimizer_states",
            "activations", "logits_loss", "temporaries"))
    cached = list(cache.rglob("*.json"))
    assert len(cached) == 2
    capsys.readouterr()
    main(args)  # second run: served from the cache
    assert "2 configurations" in capsys.readouterr().out
