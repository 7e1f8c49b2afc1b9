"""memplan profile --gpus N on the CPU: `accelerate launch` of one process per rank on gloo, each wrapping with
accelerator.prepare (memplan/profile/multi.py), a tiny Llama written from a config by the test. Rank 0's live
tensor bytes per phase equal the rank trace's (a fake process group, meta tensors) byte for byte; failures and
interruptions are results. Each profile starts four processes (launcher, accelerate launch, ranks) that import
torch/transformers/PEFT: ~30-70 s on 2 shared cores. One profile loads as users load (from_pretrained on a
random-weight checkpoint); the others use --load direct (the same tensors, no checkpoint to write:
tests/test_profile.py checks that) to save the launcher that work.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
        "tie_word_embeddings": False}
FLAGS = ["--seq-len", "128", "--lora-r", "8", "--gpus", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("random-weights")
    return dict(os.environ, PYTHONPATH=str(ROOT), MEMPLAN_WEIGHTS_CACHE=str(cache))


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def _memplan(args, env, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "memplan", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _measured(phases: dict) -> dict:
    """A rank's per-phase peaks as a prediction's phases cover them: the higher of the first step's phase and the
    same phase of the later steps (memplan.profile.compare.measured)."""
    return {p: max(v["tracker_peak_bytes"], phases.get(f"steady_{p}", {}).get("tracker_peak_bytes", 0))
            for p, v in phases.items() if not p.startswith("steady")}


def _grid_config(train):
    """The tiny model's grid configuration on the CPU: 3 steps, weights made in place, GPU kernel models."""
    from memplan.profile.grid import Config

    run = {"steps": 3, "load_path": "direct", "seed": 0, "weights_dir": None, "weights_cache": None,
           "cpu_budget_bytes": None, "memory_fraction": None, "kernels": "gpu"}
    return Config("tiny-llama", dict(TINY), "test", train.to_dict(), "cpu", run, label="tiny")


def _profile(tmp_path, tiny, env, parallel, *extra):
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    r = _memplan(["profile", tiny, "--device", "cpu", *FLAGS, "--parallel", parallel, "--steps", "2", "--kernels",
                  "gpu", "--threads", "1", "--no-progress", "--json", "--csv", tmp_path / "p.csv", *extra], env,
                 tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("parallel, load", [("fsdp", "pretrained"), ("ddp", "direct")])
def test_rank0_equals_the_rank_trace(tmp_path, tiny, env, parallel, load):
    """accelerate launch with the config file the flags make, FSDP2 (accelerator.prepare: fsdp2_prepare_model) and
    DDP on gloo, two real processes: rank 0's live tensor bytes per phase equal the rank trace's (rank 0 of 2 on a
    fake process group, meta tensors: the profile's comparison runs memplan.trace.distributed.run_rank_trace, what
    `memplan trace --gpus 2` runs), byte for byte; both ranks hold the same bytes (FSDP2 pads every shard to the
    same size)."""
    from memplan.profile import schema

    prof = _profile(tmp_path, tiny, env, parallel, "--load", load)
    trace = prof["comparison"]["trace"]["phases"]
    assert prof["comparison"]["trace"]["error_pct"] == 0.0
    assert schema.validate(prof) is None
    assert prof["status"] == "ok"
    assert prof["run"]["parallel"]["gpus"] == 2 and prof["run"]["parallel"]["strategy"] == parallel
    assert prof["run"]["parallel"]["backend"] == "gloo"
    launch = prof["run"]["launch"]  # what ran: accelerate launch with the config file the flags made
    assert launch["command"].startswith("accelerate launch --config_file ")
    assert launch["command"].endswith(" -m memplan.profile.rank " + launch["command"].split()[-1])
    cfg = launch["config"]
    assert (cfg["num_processes"], cfg["use_cpu"], cfg["mixed_precision"]) == (2, True, "no")
    if parallel == "fsdp":
        assert cfg["distributed_type"] == "FSDP"
        assert {k: cfg["fsdp_config"][k] for k in ("fsdp_version", "fsdp_auto_wrap_policy",
                                                   "fsdp_transformer_layer_cls_to_wrap", "fsdp_reshard_after_forward",
                                                   "fsdp_offload_params")} == {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False}
    else:
        assert cfg["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in cfg
    assert [r["rank"] for r in prof["ranks"]] == [0, 1] and all(r["status"] == "ok" for r in prof["ranks"])
    rank0 = _measured(prof["ranks"][0]["phases"])
    assert set(trace) == {"load", "forward", "backward", "optimizer"}
    assert {p: rank0[p] for p in trace} == trace  # byte for byte, every phase
    assert _measured(prof["ranks"][1]["phases"]) == rank0
    assert prof["measurements"]["phases"] == prof["ranks"][0]["phases"]  # the profile's figures are rank 0's
    assert prof["measurements"]["peak"]["bytes"] == max(trace.values())
    assert prof["measurements"]["largest_rank_peak"]["bytes"] == max(trace.values())
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [(r["gpus"], r["parallel"], r["status"]) for r in rows] == [("2", parallel, "ok")]
    if parallel == "ddp":  # resumable as every profile: the same configuration is not run again
        r = _memplan(["profile", tiny, "--device", "cpu", *FLAGS, "--parallel", parallel, "--steps", "2",
                      "--kernels", "gpu", "--load", load, "--no-progress", "--csv", tmp_path / "p.csv"], env, tmp_path,
                     timeout=120)
        assert r.returncode == 0 and "skipped 1 configuration" in r.stderr
        assert len(list((tmp_path / "profiles").glob("*.json"))) == 1


def test_out_of_memory_on_one_fsdp_rank_is_a_result(tmp_path, tiny, env):
    """--gpus 1 --parallel fsdp still runs FSDP2 through accelerate launch (one rank); --cpu-budget makes it record
    its simulated OOM: the profile is "oom" (a final result that a resumed grid skips), naming the rank, with what
    was measured before it."""
    from memplan.profile import schema

    prof = _profile(tmp_path, tiny, env, "fsdp", "--gpus", "1", "--cpu-budget", "1.5MiB", "--no-trace", "--load",
                    "direct")
    assert schema.validate(prof) is None
    cfg = prof["run"]["launch"]["config"]
    assert (cfg["distributed_type"], cfg["num_processes"], prof["run"]["parallel"]["gpus"]) == ("FSDP", 1, 1)
    assert prof["status"] == "oom" and prof["oom"]["rank"] == 0 and prof["oom"]["kind"] == "tracker-budget"
    assert prof["oom"]["budget_bytes"] == int(1.5 * 2**20)
    assert [r["rank"] for r in prof["ranks"]] == [0] and prof["ranks"][0]["status"] == "oom"
    assert 0 < prof["ranks"][0]["phases"]["load"]["tracker_peak_bytes"] <= 1.5 * 2**20
    assert prof["key"] in schema.done_keys(tmp_path / "profiles")


def test_ctrl_c_keeps_what_every_rank_measured(tmp_path, tiny):
    """SIGINT to the launcher (what the grid forwards on Ctrl-C) in rank 0's backward: every rank records what it
    measured ("interrupted"), the launcher writes one profile with them; a resumed grid runs it again."""
    pytest.importorskip("torch")
    from memplan.profile import schema
    from memplan.profile.grid import run_one
    from memplan.spec import TrainSpec

    train = TrainSpec(seq_len=128, lora_r=8, gpus=2, parallel="ddp")
    cfg = _grid_config(train)
    pid = {}

    def on_event(ev):
        if ev["event"] == "started":
            pid["launcher"] = ev["pid"]
        elif ev["event"] == "phase" and ev["phase"] == "backward":
            os.kill(pid["launcher"], signal.SIGINT)

    out = run_one(cfg, tmp_path / "profiles", on_event=on_event, trace=False, threads=1)
    assert out.status == "interrupted", out.log_tail
    prof = json.loads(Path(out.path).read_text())
    assert schema.validate(prof) is None
    assert [r["rank"] for r in prof["ranks"]] == [0, 1]
    for r in prof["ranks"]:
        assert r["status"] == "interrupted"
        assert r["phases"]["load"]["tracker_peak_bytes"] > 0 and r["phases"]["forward"]["tracker_peak_bytes"] > 0
    assert schema.done_keys(tmp_path / "profiles") == {}


def test_a_killed_rank_is_a_result(tmp_path):
    """A rank killed outright (the host's OOM killer, a segfault) mid-step: the launcher stops the rank waiting for it
    in a collective, and the profile is an "error" naming the killed rank, with the phases that rank had reported
    (from its per-phase lines) and what the surviving rank measured."""
    pytest.importorskip("torch")
    from memplan.profile import schema
    from memplan.profile.grid import run_one
    from memplan.spec import TrainSpec

    train = TrainSpec(seq_len=128, lora_r=8, gpus=2, parallel="fsdp")
    cfg = _grid_config(train)
    pids = {}

    def on_event(ev):
        if ev["event"] == "ranks":
            pids["ranks"] = ev["pids"]
        elif ev["event"] == "phase" and ev["phase"] == "backward" and "killed" not in pids:
            pids["killed"] = True
            os.kill(pids["ranks"][1], signal.SIGKILL)

    out = run_one(cfg, tmp_path / "profiles", on_event=on_event, trace=False, threads=1)
    assert out.status == "error", out.log_tail
    prof = json.loads(Path(out.path).read_text())
    assert schema.validate(prof) is None
    assert prof["error"]["rank"] == 1 and prof["error"]["type"] == "RankKilled"
    zero, one = prof["ranks"]
    assert one["status"] == "killed" and one["phases"]["load"]["tracker_peak_bytes"] > 0
    assert zero["status"] in ("interrupted", "error") and zero["phases"]["forward"]["tracker_peak_bytes"] > 0
    assert schema.done_keys(tmp_path / "profiles") == {}  # an error is not final: a resumed grid runs it again


# ------------------------------------------------------------------------- the launcher's bookkeeping (no torch)

def test_merge_names_the_failed_rank_and_keeps_a_killed_ranks_phases(tmp_path):
    """A rank killed before it wrote its record is rebuilt from the per-phase lines it printed ("interrupted" when
    the launcher stopped it, "killed" otherwise); the profile's status is the cause's (an OOM on rank 1 before a
    kill), its measurements rank 0's."""
    from memplan.profile.multi import _rank_record, merge

    stream = {"phases": {"load": {"tracker_peak_bytes": 100}, "forward": {"tracker_peak_bytes": 400}}, "tail": []}
    assert _rank_record(0, tmp_path / "missing.json", stream, -9, stopped=True)["status"] == "interrupted"
    killed = _rank_record(0, tmp_path / "missing.json", stream, -9)
    assert killed["status"] == "killed" and killed["phases"]["forward"]["tracker_peak_bytes"] == 400
    oom = {"rank": 1, "status": "oom", "phases": {"load": {"tracker_peak_bytes": 100},
                                                  "forward": {"tracker_peak_bytes": 500}},
           "peak": None, "oom": {"phase": "forward", "requested_bytes": 64}, "error": None, "measurements": None}
    profile = {"status": "error", "run": {"device": "cpu"}, "measurements": {"phases": {}}, "oom": None,
               "error": None}
    merge(profile, {0: killed, 1: oom}, 2)
    assert profile["status"] == "oom" and profile["oom"] == {"phase": "forward", "requested_bytes": 64, "rank": 1}
    assert [r["status"] for r in profile["ranks"]] == ["killed", "oom"]
    assert profile["measurements"]["phases"] == stream["phases"]
    assert profile["measurements"]["largest_rank_peak"] == {"rank": 1, "phase": "forward", "bytes": 500,
                                                            "measure": "tracker_peak_bytes"}


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "zero3", "--device", "cpu"], "DeepSpeed's ZeRO engine needs CUDA"),
    (["--parallel", "fsdp", "--fsdp-version", "1", "--device", "cpu"], "FSDP1 is estimated only"),
    (["--parallel", "fsdp", "--offload", "params", "--device", "cpu"], "means nothing with --device cpu"),
    (["--parallel", "fsdp", "--device", "cuda"], "GPU(s) visible here"),
])
def test_what_cannot_be_profiled_is_one_line(tmp_path, tiny, env, flags, message):
    if "cuda" in flags:
        from memplan.profile.env import detect_gpus

        if len(detect_gpus()[0]) >= 2:
            pytest.skip("two GPUs are visible here")
    r = _memplan(["profile", tiny, "--gpus", "2", *flags, "--no-progress"], env, tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "profiles").exists()


def test_each_rank_reads_its_own_gpu(monkeypatch):
    """Rank r measures CUDA device r: NVML is opened on entry r of CUDA_VISIBLE_DEVICES (an index or a UUID)."""
    from memplan.profile.runner import _visible_index, _visible_uuid

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert (_visible_index(0), _visible_index(1)) == (2, 3) and _visible_uuid(1) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb")
    assert _visible_uuid(1) == "GPU-bbb"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _visible_index(1) == 1


@pytest.mark.parametrize("flags, expect", [
    (dict(gpus=4, parallel="zero3", offload="params", batch_size=2),
     {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_MIXED_PRECISION": "bf16",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}),
    (dict(gpus=2, parallel="zero2", offload="optimizer", compute_dtype="fp16"),
     {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_MIXED_PRECISION": "fp16",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none"}),
    (dict(gpus=2, parallel="fsdp-grad-op"),
     {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
      "FSDP_OFFLOAD_PARAMS": "false", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
      "ACCELERATE_MIXED_PRECISION": "no"}),
    (dict(gpus=1, parallel="fsdp", offload="params"),
     {"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "true"}),
], ids=["zero3-offload", "zero2-offload-fp16", "fsdp-grad-op", "fsdp-1gpu-offload"])
def test_the_config_file_is_what_accelerate_launch_reads(tmp_path, flags, expect):
    """The config file the flags make, read by accelerate's own launch command (its loader refuses unknown keys): the
    environment its launcher gives the ranks, and the DeepSpeed / FSDP plugin each rank's Accelerator() builds
    from it, say the strategy, the ZeRO stage, the offload and the precision the flags asked for. DeepSpeed cannot
    run on the CPU: this is its check here (the run itself is scripts/gpu_validate.sh's)."""
    pytest.importorskip("accelerate")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from memplan.profile.accelerate_config import accelerate_config, decoder_layer_class, launch_argv, write_config
    from memplan.spec import TrainSpec

    train = TrainSpec(**flags)
    layer = decoder_layer_class(TINY) if train.strategy.startswith("fsdp") else None
    path = write_config(tmp_path / "accelerate.yaml", accelerate_config(train, "cuda", layer))
    argv = launch_argv(path, tmp_path / "job.json")
    args = launch_command_parser().parse_args(argv[3:])
    args, defaults, from_config = _validate_launch_command(args)
    assert args.num_processes == train.gpus and args.module and args.training_script == "memplan.profile.rank"
    if train.strategy.startswith("zero"):  # as launch_command sets it before deepspeed_launcher
        args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config]
                                                                + ["mixed_precision"] * from_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    assert {k: env.get(k) for k in expect} == expect
    # the plugin each rank's Accelerator() builds from that environment (AcceleratorState sets its precision)
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment

    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}):
        if train.strategy.startswith("zero"):
            plugin = DeepSpeedPlugin()
            plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
            zero = plugin.deepspeed_config["zero_optimization"]
            assert zero["stage"] == int(train.strategy[-1])
            assert zero["offload_optimizer"]["device"] == ("cpu" if train.offload != "none" else "none")
            assert zero["offload_param"]["device"] == ("cpu" if train.offload == "params" else "none")
            assert plugin.deepspeed_config[train.compute_dtype]["enabled"] is True
        else:
            plugin = FullyShardedDataParallelPlugin()
            assert (plugin.fsdp_version, plugin.reshard_after_forward) == (2, train.strategy == "fsdp")
            assert type(plugin.cpu_offload).__name__ == ("CPUOffloadPolicy" if train.offload == "params"
                                                         else "OffloadPolicy")
            assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
