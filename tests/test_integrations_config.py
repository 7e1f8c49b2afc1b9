"""`--from FILE`: the example configs in each trainer's schema map onto the settings their trainer runs, flags
override them, and bad configs fail in one line naming the key and the file."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.errors import MemplanError
from memplan.integrations.config import read_config
from memplan.spec import TRAIN_FIELDS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*argv):
    return subprocess.run([sys.executable, "-m", "memplan", *argv], capture_output=True, text=True, timeout=120)


def guarded(m, setting, value):
    """A setting owned by another memplan feature: mapped when this checkout has the field, else reported."""
    if setting in TRAIN_FIELDS and m.settings.get(setting) == value:
        return True
    return any(f"{setting}={value}" in why for _, _, why in m.pending)


def test_axolotl_qlora():
    m = read_config(str(EXAMPLES / "axolotl/llama-3-8b-qlora.yml"))
    assert m.format == "axolotl" and m.model == "meta-llama/Meta-Llama-3-8B"
    assert {k: m.settings[k] for k in ("bits", "quant_type", "double_quant", "compute_dtype", "method", "upcast",
                                       "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "seq_len",
                                       "batch_size", "gradient_checkpointing", "optimizer")} == {
        "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16", "method": "lora",
        "upcast": True, "lora_r": 32, "lora_alpha": 16, "lora_dropout": 0.05, "lora_targets": "all-linear",
        "seq_len": 4096, "batch_size": 2, "gradient_checkpointing": True, "optimizer": "paged-adamw"}
    assert guarded(m, "attention", "flash_attention_2")
    assert m.data["packing"] is True and m.data["format"] == "chat" and m.data["text_field"] == "messages"
    ignored = dict(m.ignored)
    assert "no effect" in ignored["learning_rate"] and ignored["wandb_project"] == "logging"


def test_axolotl_8bit_deepspeed_offload():
    m = read_config(str(EXAMPLES / "axolotl/mistral-7b-lora-8bit-zero2.yml"))
    assert m.settings["bits"] == 8 and m.settings["optimizer"] == "adamw-8bit"
    assert m.settings["lora_targets"] == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert m.settings["gradient_checkpointing"] is True
    assert guarded(m, "activation_offload", "checkpoints")
    # deepspeed_configs/zero2.json next to the config: ZeRO-2 with the optimizer offloaded to the CPU
    assert guarded(m, "parallel", "zero2") and guarded(m, "offload", "optimizer")
    assert m.data["order"] == "group_by_length" and m.data["too_long"] == "truncate"


def test_llamafactory():
    m = read_config(str(EXAMPLES / "llamafactory/llama3_lora_sft_bnb.yaml"))
    assert m.format == "llamafactory" and m.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    s = m.settings
    assert (s["bits"], s["double_quant"], s["upcast"], s["lora_r"], s["lora_alpha"], s["lora_dropout"]) == \
        (4, True, False, 8, 16, 0.0)  # LLaMA-Factory's defaults: alpha 2 x rank, dropout 0, no kbit upcast
    assert (s["lora_targets"], s["seq_len"], s["batch_size"], s["optimizer"], s["lora_dtype"]) == \
        ("all-linear", 2048, 1, "adamw", "fp32")
    m = read_config(str(EXAMPLES / "llamafactory/qwen2_5_lora_sft_fa2.yaml"))
    assert m.settings["bits"] == 16 and m.settings["optimizer"] == "adamw-8bit" and m.data["packing"] is True
    assert guarded(m, "attention", "flash_attention_2")


def test_trl_script_config_and_saved_sftconfig():
    m = read_config(str(EXAMPLES / "trl/sft_qlora.yaml"))
    assert m.format == "trl" and m.model == "Qwen/Qwen2.5-7B"
    s = m.settings
    assert (s["bits"], s["double_quant"], s["upcast"], s["lora_targets"], s["batch_size"], s["seq_len"],
            s["optimizer"], s["compute_dtype"]) == (4, True, False, "all-linear", 2, 2048, "paged-adamw-8bit", "bf16")
    # SFTConfig.to_dict() as saved by TRL 1.16: 135 keys, no model: the rest is ignored with a reason
    m = read_config(str(EXAMPLES / "trl/sft_config.json"))
    assert m.model is None and "bits" not in m.settings and "method" not in m.settings
    assert (m.settings["batch_size"], m.settings["seq_len"], m.settings["gradient_checkpointing"]) == (4, 1024, True)
    assert m.data["order"] == "group_by_length"
    raw = json.loads((EXAMPLES / "trl/sft_config.json").read_text())
    accounted = ({k for k, _, _ in m.rows} | {k for k, _ in m.ignored} | {k for k, _, _ in m.pending}
                 | {k for k, _ in m.read})
    assert set(raw) == accounted  # every key of the file is mapped, read, not modelled or ignored with a reason


def test_torchtune():
    m = read_config(str(EXAMPLES / "torchtune/llama3_1_8B_qlora_single_device.yaml"))
    assert m.format == "torchtune" and m.model == "llama-3.1-8b"
    s = m.settings
    assert (s["bits"], s["upcast"], s["lora_dtype"], s["lora_r"], s["batch_size"], s["gradient_checkpointing"]) == \
        (4, False, "bf16", 8, 2, True)
    assert s["lora_targets"] == ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert any("torchao NF4 is not bitsandbytes" in n for n in m.notes)
    assert any(k == "loss" for k, _, _ in m.pending)  # CEWithChunkedOutputLoss: said, not modelled
    m = read_config(str(EXAMPLES / "torchtune/llama3_2_1B_lora_single_device.yaml"))
    assert m.model == "llama-3.2-1b" and m.settings["bits"] == 16 and m.settings["lora_r"] == 64


def test_cli_from_with_override_and_mapping(capsys):
    assert main(["estimate", "--from", str(EXAMPLES / "axolotl/llama-3-8b-qlora.yml"), "--seq-len", "1024",
                 "--json"]) == 0
    out = capsys.readouterr()
    d = json.loads(out.out)
    assert d["model"] == "llama-3-8b" and d["config"]["seq_len"] == 1024 and d["config"]["lora_r"] == 32
    assert d["config"]["optimizer"] == "paged-adamw" and d["config"]["batch_size"] == 2
    assert "command line: --seq-len 1024 (the config says 4096)" in out.err
    assert "sequence_len" in out.err and "-> seq_len 4096" in out.err and "ignored:" in out.err
    # the same configuration typed as flags gives the same estimate
    assert main(["estimate", "llama-3-8b", "--seq-len", "1024", "--lora-r", "32", "--lora-alpha", "16",
                 "--optimizer", "paged-adamw", "--batch-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == d["peak_bytes"]


@pytest.mark.parametrize("command", ["fit", "gpus", "sweep"])
def test_from_on_planning_commands(command, tmp_path, capsys):
    path = str(EXAMPLES / "llamafactory/llama3_lora_sft_bnb.yaml")
    argv = {"fit": ["fit", "--from", path, "--gpu", "rtx-4090", "--json"],
            "gpus": ["gpus", "--from", path, "--json"],
            "sweep": ["sweep", "--from", path, "--seq-len", "512,1024", "--out", str(tmp_path / "s.csv")]}[command]
    assert main(argv) == 0
    if command == "sweep":
        rows = (tmp_path / "s.csv").read_text().splitlines()
        assert len(rows) == 3 and "llama-3-8b" in rows[1]
    else:
        d = json.loads(capsys.readouterr().out)
        assert d["config"]["lora_r"] == 8 and d["config"]["upcast"] is False


def bad(tmp_path, text, name="bad.yml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,words", [
    ("base_model: llama-3-8b\nadapter: qlora\nload_in_4bit: true\nload_in_8bit: true\nlora_target_linear: true\n",
     ["load_in_4bit/load_in_8bit", "both on"]),
    ("base_model: llama-3-8b\nadapter: qlora\nload_in_4bit: true\nlora_target_linear: true\noptimizer: adamw_foo\n",
     ["optimizer", "unknown optimizer 'adamw_foo'"]),
    ("base_model: llama-3-8b\nadapter: lora\nlora_target_modules: [q_proj, foo_proj]\n",
     ["lora_target_modules", "foo_proj"]),
    ("base_model: llama-3-8b\nadapter: lora\nlora_target_linear: true\nmicro_batch_size: two\n",
     ["micro_batch_size", "expected an integer", "'two'"]),
    ("model_name_or_path: llama-3-8b\nfinetuning_type: full\nquantization_bit: 4\n",
     ["quantization_bit", "frozen"]),
    ("base_model: llama-3-8b\nadapter: lora\nlora_target_linear: true\noptimizer: lion_8bit\n",
     ["optimizer", "not modelled", "--optimizer"]),
    ("base_model: !!python/object/apply:os.system ['touch pwned']\n", ["malformed YAML"]),
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
     for p, c in zip("abcdefghijklm", "bcdefghijklmn")), ["YAML aliases"]),
])
def test_bad_configs_one_line_exit_2(tmp_path, text, words):
    path = bad(tmp_path, text)
    r = run("estimate", "--from", path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in err[0] for w in words), err[0]
    assert path in err[0] or "--from" in err[0]
    assert not (tmp_path / "pwned").exists()


def test_unmodelled_optimizer_overridden_by_flag(tmp_path, capsys):
    path = bad(tmp_path, "base_model: llama-3-8b\nadapter: lora\nlora_target_linear: true\noptimizer: lion_8bit\n")
    assert main(["estimate", "--from", path, "--optimizer", "adamw-8bit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["optimizer"] == "adamw-8bit"


def test_pickle_and_directory_refused(tmp_path):
    (tmp_path / "training_args.bin").write_bytes(b"\x80\x04not read")
    for target in (str(tmp_path / "training_args.bin"), str(tmp_path)):
        with pytest.raises(MemplanError, match="pickle|directory"):
            read_config(target)


def test_model_from_config_resolves_local_folder(tmp_path, capsys):
    """The config's model resolves like a MODEL argument: a local folder with a config.json (hub-style, with an
    old field name) is read, never downloaded."""
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}))
    cfg = bad(tmp_path, f"base_model: {folder}\nadapter: lora\nlora_target_linear: true\nsequence_len: 256\nbf16: true\n")
    assert main(["estimate", "--from", cfg, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "my-llama" and d["config"]["seq_len"] == 256 and d["config"]["bits"] == 16


def test_from_estimate_imports_no_torch():
    code = ("import sys, io, contextlib\nfrom memplan.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    main(['estimate', '--from', {str(EXAMPLES / 'trl/sft_qlora.yaml')!r}])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---- multi-GPU, flash-attention, Liger / CCE and activation offloading keys

def test_multi_gpu_kernels_and_offload_examples():
    s = read_config(str(EXAMPLES / "axolotl/llama-3-70b-qlora-fsdp2.yml")).settings
    assert (s["parallel"], s["fsdp_version"], s["offload"], s["attention"], s["liger"], s["loss"]) == \
        ("fsdp", 2, "none", "flash_attention_2", True, "liger")
    assert s["upcast"] is False and s["quant_storage"] == "bf16"  # FSDP-QLoRA: no kbit upcast, bf16 storage
    m = read_config(str(EXAMPLES / "trl/sft_fsdp_liger.yaml"))
    s = m.settings
    assert (s["parallel"], s["fsdp_version"], s["attention"], s["liger"], s["activation_offload"]) == \
        ("fsdp", 2, "flash_attention_2", True, "all")
    assert "loss" not in s and any("layer kernels only" in n for n in m.notes)  # SFTTrainer drops Liger's FLCE
    s = read_config(str(EXAMPLES / "llamafactory/llama3_lora_sft_ds3.yaml")).settings
    assert (s["parallel"], s["offload"], s["attention"], s["liger"], s["loss"]) == \
        ("zero3", "none", "flash_attention_2", True, "liger")
    assert "gpus" not in s  # the launcher's: --gpus


def test_sharding_config_asks_for_gpus(capsys):
    path = str(EXAMPLES / "llamafactory/llama3_lora_sft_ds3.yaml")
    r = run("estimate", "--from", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and path in err[0] and "deepspeed" in err[0] and "--gpus N" in err[0], err
    assert main(["estimate", "--from", path, "--gpus", "4", "--json"]) == 0
    out = capsys.readouterr()
    d = json.loads(out.out)
    assert (d["config"]["gpus"], d["config"]["parallel"]) == (4, "zero3")
    assert "(GPU count)" in out.err and "gpus 4" in out.err and "per rank" in out.err
    # --parallel on the command line replaces the file's strategy: one GPU, no --gpus needed
    assert main(["estimate", "--from", path, "--parallel", "none", "--json"]) == 0
    d1 = json.loads(capsys.readouterr().out)
    assert (d1["config"]["gpus"], d1["config"]["parallel"]) == (1, "none")
    assert d1["device_total_bytes"] > d["device_total_bytes"]  # ZeRO-3 over 4 GPUs holds less per rank


AXO = "base_model: llama-3-8b\nadapter: lora\nlora_target_linear: true\nbf16: true\n"


def test_deepspeed_from_the_file_or_its_name(tmp_path):
    # not on this machine: the stage and offload from axolotl's / LLaMA-Factory's file names
    for name, want in (("deepspeed_configs/zero3_bf16_cpuoffload_all.json", ("zero3", "params")),
                       ("deepspeed_configs/zero1.json", ("zero1", "none")),
                       ("examples/deepspeed/ds_z2_offload_config.json", ("zero2", "optimizer")),
                       ("examples/deepspeed/ds_z0_config.json", ("ddp", "none"))):
        m = read_config(bad(tmp_path, AXO + f"deepspeed: {name}\n"))
        assert (m.settings["parallel"], m.settings["offload"]) == want, name
        assert any("file name" in setting for _, _, setting in m.rows)
    # on this machine: its JSON decides (offload_param alone is said to be modelled with the optimizer states)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {
        "device": "cpu"}}}))
    m = read_config(bad(tmp_path, AXO + "deepspeed: ds.json\nload_in_8bit: true\n"))
    assert (m.settings["parallel"], m.settings["offload"], m.settings["upcast"]) == ("zero3", "params", False)
    assert any("offload_param without offload_optimizer" in n for n in m.notes)
    m = read_config(bad(tmp_path, AXO + "deepspeed: my_config.json\n"))
    assert "parallel" not in m.settings and any(k == "deepspeed" for k, _, _ in m.pending)


def test_fsdp_options_as_transformers_reads_them(tmp_path):
    m = read_config(bad(tmp_path, json.dumps({"per_device_train_batch_size": 2, "fsdp": "shard_grad_op offload",
                                              "fsdp_config": {"fsdp_version": 1}}), "args.json"))
    assert (m.settings["parallel"], m.settings["fsdp_version"], m.settings["offload"]) == ("fsdp-grad-op", 1, "params")
    m = read_config(bad(tmp_path, json.dumps({"per_device_train_batch_size": 2, "fsdp": True,
                                              "fsdp_config": {"reshard_after_forward": False}}), "args.json"))
    assert (m.settings["parallel"], m.settings["fsdp_version"]) == ("fsdp-grad-op", 2)  # transformers 5.24 default
    m = read_config(bad(tmp_path, AXO + "fsdp: [full_shard, auto_wrap]\nfsdp_config:\n  fsdp_offload_params: true\n"
                        "  fsdp_sharding_strategy: SHARD_GRAD_OP\n"))
    assert (m.settings["parallel"], m.settings["fsdp_version"], m.settings["offload"]) == ("fsdp-grad-op", 1, "params")
    with pytest.raises(MemplanError, match="fsdp.*unknown fsdp option 'full_shrad'"):
        read_config(bad(tmp_path, json.dumps({"per_device_train_batch_size": 2, "fsdp": "full_shrad"}), "a.json"))
    with pytest.raises(MemplanError, match="DeepSpeed and FSDP are both set"):
        read_config(bad(tmp_path, AXO + "deepspeed: zero2.json\nfsdp_config:\n  offload_params: false\n"))


def test_plugin_keys_and_offloading(tmp_path):
    liger = "liger_rms_norm: true\nliger_fused_linear_cross_entropy: true\n"
    m = read_config(bad(tmp_path, AXO + liger))  # no plugin: axolotl neither validates nor applies them
    assert "liger" not in m.settings and "loss" not in m.settings
    assert "LigerPlugin" in dict(m.ignored)["liger_rms_norm"]
    m = read_config(bad(tmp_path, AXO + "plugins:\n  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n"
                        "cut_cross_entropy: true\n"))
    assert m.settings["loss"] == "cce"
    for value, want in (("true", "all"), ("legacy", "checkpoints")):
        m = read_config(bad(tmp_path, AXO + f"gradient_checkpointing: true\nactivation_offloading: {value}\n"))
        assert m.settings["activation_offload"] == want
    m = read_config(bad(tmp_path, AXO + "gradient_checkpointing: offload\nactivation_offloading: true\n"))
    assert m.settings["activation_offload"] == "all" and any("both set" in n for n in m.notes)
    # TrainingArguments (the Trainer, not SFTTrainer): Liger's fused linear cross-entropy is on unless configured off
    args = {"per_device_train_batch_size": 2, "use_liger_kernel": True}
    assert read_config(bad(tmp_path, json.dumps(args), "a.json")).settings["loss"] == "liger"
    args["liger_kernel_config"] = {"fused_linear_cross_entropy": False}
    s = read_config(bad(tmp_path, json.dumps(args), "a.json")).settings
    assert s["liger"] is True and "loss" not in s


def test_torchtune_distributed_keys(tmp_path):
    text = (EXAMPLES / "torchtune/llama3_2_1B_lora_single_device.yaml").read_text()
    text += ("fsdp_cpu_offload: True\nenable_activation_offloading: True\n"
             "loss:\n  _component_: torchtune.modules.loss.LinearCrossEntropyLoss\n")
    m = read_config(bad(tmp_path, text.replace("CEWithChunkedOutputLoss", "X"), "1B_lora.yaml"))
    s = m.settings
    assert (s["parallel"], s["fsdp_version"], s["offload"], s["activation_offload"], s["loss"]) == \
        ("fsdp", 2, "params", "all", "cce")
    # a distributed config without those keys: the recipe is on tune run's command line, and the mapping says so
    m = read_config(bad(tmp_path, (EXAMPLES / "torchtune/llama3_2_1B_lora_single_device.yaml").read_text(),
                        "1B_lora.yaml"))
    assert "parallel" not in m.settings and any("--parallel fsdp --fsdp-version 2 --gpus N" in n for n in m.notes)
