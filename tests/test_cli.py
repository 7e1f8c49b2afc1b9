"""The estimate command as a user runs it: output formats, grids, start-up imports, and every error path."""
import csv
import json
import subprocess
import sys

import pytest

from memplan.cli import main
from memplan.report.rows import COLUMN_NAMES

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "pandas", "matplotlib", "numpy")


def run(*argv):
    return subprocess.run([sys.executable, "-m", "memplan", *argv], capture_output=True, text=True, timeout=60)


def test_estimate_imports_no_torch():
    code = ("import sys, io, contextlib\nfrom memplan.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['estimate', 'llama-2-70b', '--bits', '4'])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_json_single(capsys):
    assert main(["estimate", "llama-2-7b", "--json", "--seq-len", "1024"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "llama-2-7b" and d["config"]["seq_len"] == 1024 and d["config"]["bits"] == 4
    assert d["params"]["total"] == 6_738_415_616
    assert sum(d["components"].values()) == d["peak_bytes"] == d["phases"][d["peak_phase"]]
    assert d["device_total_bytes"] > d["peak_bytes"]


def test_grid_json_and_csv(tmp_path, capsys):
    path = tmp_path / "grid.csv"
    argv = ["estimate", "qwen2.5-0.5b", "--seq-len", "512,2048,8192", "--bits", "4,8,16", "--csv", str(path)]
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 9
    assert [(r["config"]["seq_len"], r["config"]["bits"]) for r in rows[:3]] == [(512, 4), (2048, 4), (8192, 4)]  # bits vary slowest (flag table order)
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMN_NAMES
    assert [int(r["peak_bytes"]) for r in table] == [r["peak_bytes"] for r in rows]


def test_table_output_names_peak_phase_and_gpu(capsys):
    assert main(["estimate", "llama-2-7b", "--gpu", "rtx-4090"]) == 0
    out = capsys.readouterr().out
    assert "tensor peak" in out and "device total" in out and "rtx-4090" in out and "fits" in out


@pytest.mark.parametrize("argv, needle", [
    (["estimate", "llama-2-7x"], "did you mean: llama-2-7b"),
    (["estimate", "llama-2-7b", "--bits", "3"], "unsupported bits 3"),
    (["estimate", "llama-2-7b", "--seq-len", "0"], "seq-len must be a positive integer"),
    (["estimate", "llama-2-7b", "--batch-size", "-4"], "batch-size must be a positive integer"),
    (["estimate", "llama-2-7b", "--lora-r", "x"], "expected an integer"),
    (["estimate", "llama-2-7b", "--checkpointing", "maybe"], "expected on or off"),
    (["estimate", "llama-2-7b", "--gpu", "rtx-9999"], "unknown GPU"),
    (["estimate", "llama-2-7b", "--nope"], "unrecognized arguments"),
    (["estimate", "org/not-cached-model"], "never downloads"),
])
def test_errors_are_one_line_exit_2(argv, needle):
    out = run(*argv)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("content, needle", [
    ('{"model_type": "llama", "hidden_size": 64', "malformed JSON"),
    # absent fields take the config class's defaults (as in transformers); what transformers rejects is named
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 6}',
     "hidden_size (64) is not a multiple of num_attention_heads (6)"),
    ('{"model_type": "not_a_model", "hidden_size": 64}', "does not know model_type 'not_a_model'"),
    ('{"hidden_size": 64}', "missing the field 'model_type'"),
    ('[1, 2]', "must be a JSON object"),
    ('{"model_type": "llama", "hidden_size": "big", "num_hidden_layers": 2, "num_attention_heads": 2,'
     ' "vocab_size": 10, "intermediate_size": 8}', "'hidden_size' must be int, got 'big'"),
])
def test_bad_config_files(tmp_path, content, needle):
    path = tmp_path / "config.json"
    path.write_text(content)
    out = run("estimate", str(path))
    assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_local_config_folder(tmp_path, capsys):
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["estimate", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total"] == 2 * 1000 * 256 + 2 * (4 * 256 * 256 + 3 * 256 * 512 + 512) + 256


def test_params_and_models(capsys):
    assert main(["params", "llama-3-8b", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total"] == 8_030_261_248 and d["num_layers"] == 32
    assert main(["models", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert {"llama-2-70b", "mixtral-8x7b", "qwen2.5-72b", "gemma-2-27b", "falcon-40b", "opt-6.7b"} <= names


def test_remote_code_config_needs_the_flag(tmp_path, capsys):
    """A model_type only remote code provides needs the flag; a native one is read natively whatever its auto_map
    says, and the output says so."""
    cfg = {"model_type": "internlm2", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 1000, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = run("estimate", str(tmp_path))
    assert out.returncode == 2 and "remote code" in out.stderr and "--trust-remote-code" in out.stderr
    native = dict(cfg, model_type="llama", intermediate_size=512)
    (tmp_path / "config.json").write_text(json.dumps(native))
    assert main(["estimate", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"]["total"] > 0 and any("auto_map" in n and "natively" in n for n in result["notes"])
