"""MemplanCallback in real CPU training runs: transformers' Trainer and TRL's SFTTrainer (unchanged), a tiny Llama
built from a config with PEFT LoRA. On the CPU the callback measures with memplan's live-bytes tracker; the
estimate it logs must agree with those bytes, it must warn before a batch that would not fit, and the profile it
writes must be a valid memplan profile."""
import json
import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from memplan.profile.schema import read_profile  # noqa: E402

LENGTHS = [48] * 10 + [160]  # the long row comes last (sequential order): after the compared steps


def _model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def _rows():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 512, (n,), generator=g).tolist()} for n in LENGTHS]


def _collate(feats):
    m = max(len(f["input_ids"]) for f in feats)
    ids = torch.tensor([f["input_ids"] + [0] * (m - len(f["input_ids"])) for f in feats])
    return {"input_ids": ids, "labels": ids.clone()}


def _train(kind, tmp_path, callback):
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, use_cpu=True,
                  optim="adamw_torch", report_to="none", gradient_checkpointing=True, save_strategy="no",
                  train_sampling_strategy="sequential", logging_steps=1)
    if kind == "Trainer":
        from transformers import Trainer, TrainingArguments

        trainer = Trainer(model=_model(), args=TrainingArguments(**common), train_dataset=_rows(),
                          data_collator=_collate, callbacks=[callback])
    else:
        pytest.importorskip("trl", reason="TRL is in the dev extra; without it the SFTTrainer run is skipped")
        from datasets import Dataset
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast
        from trl import SFTConfig, SFTTrainer

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2,
                                                                                   "<unk>": 3}, unk_token="<unk>")),
                                      pad_token="<pad>", eos_token="</s>", bos_token="<s>")
        trainer = SFTTrainer(model=_model(), args=SFTConfig(**common, max_length=1024, bf16=False),
                             train_dataset=Dataset.from_list(_rows()), processing_class=tok, callbacks=[callback])
    trainer.train()


_RUNS = {}


def _run(kind, tmp_path_factory):
    """One training run per trainer for the whole module (each takes seconds on the CPU)."""
    if kind not in _RUNS:
        from memplan.integrations.transformers import MemplanCallback

        tmp = tmp_path_factory.mktemp(kind)
        # the plain Trainer runs on a simulated device between its measured peak and the 160-token batch's
        cb = MemplanCallback(output_dir=str(tmp / "profiles"),
                             cpu_budget_bytes=int(1.3 * _estimate(2, 48)) if kind == "Trainer" else None)
        handler = _Capture()
        logging.getLogger("memplan").addHandler(handler)
        logging.getLogger("memplan").setLevel(logging.INFO)
        disabled = logging.root.manager.disable  # `memplan trace` run in-process elsewhere disables logging
        logging.disable(logging.NOTSET)
        try:
            _train(kind, tmp, cb)
        finally:
            logging.disable(disabled)
            logging.getLogger("memplan").removeHandler(handler)
        _RUNS[kind] = (cb, tmp, "\n".join(handler.lines))
    return _RUNS[kind]


def _estimate(batch, seq):
    from memplan.architectures import from_hf_config
    from memplan.estimate import estimate
    from memplan.spec import TrainSpec

    spec = TrainSpec(bits=32, compute_dtype="fp32", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_targets="qv",
                     batch_size=batch, seq_len=seq, upcast=False)
    return estimate(from_hf_config(_model().config.to_dict(), "tiny", "test"), spec).peak_bytes


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("kind", ["Trainer", "SFTTrainer"])
def test_callback_measures_compares_and_writes_a_profile(kind, tmp_path_factory):
    cb, tmp_path, text = _run(kind, tmp_path_factory)
    # the TrainSpec it read from the live model and arguments
    spec = cb.spec
    assert (spec.method, spec.bits, spec.lora_r, spec.lora_targets, spec.optimizer, spec.batch_size,
            spec.gradient_checkpointing, spec.lora_dtype) == ("lora", 32, 8, ("q_proj", "v_proj"), "adamw", 2, True,
                                                              "fp32")
    cmp_ = cb.comparison
    assert cmp_["measured"]["shape"] == [2, 48]
    # the estimate agrees with the live tensor bytes of the real run, phase by phase. TRL's SFTTrainer computes the
    # loss through its fused LM head (tiles of 32768 vocabulary columns: here, with 512, far more than the logits):
    # the callback says so, and forward/backward then differ by that loss term
    errors = cmp_["estimate"]["phase_error_pct"]
    fused = kind == "SFTTrainer"
    assert bool(cmp_["notes"]) == fused and (not fused or "fused LM head" in cmp_["notes"][0])
    for phase, err in errors.items():
        if fused and phase in ("forward", "backward"):
            tile = 2 * 47 * 32768 * 4  # one fp32 tile: (b·(s-1)) positions × 32768 columns
            assert 0.8 * tile < cmp_["measured"]["phases"][phase] - cmp_["estimate"]["phases"][phase] < 1.6 * tile
        else:
            assert abs(err) < 8, (phase, cmp_)
    assert cmp_["measured"]["phases"]["backward"] == cmp_["measured"]["peak_bytes"]
    assert "measured (live tensor bytes (CPU tracker)) vs estimate" in text
    # the profile: valid memplan.profile/1, one file per run, readable by every profile reader
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1
    prof = read_profile(files[0])
    assert prof is not None and prof["status"] == "ok" and prof["run"]["device"] == "cpu"
    assert prof["run"]["steps"] == 3 and prof["train"]["seq_len"] == 48
    assert prof["measurements"]["peak"]["bytes"] == cmp_["measured"]["peak_bytes"]  # the steady steps' backward
    assert json.loads(files[0].read_text())["comparison"]["estimate"]["error_pct"] == cmp_["estimate"]["error_pct"]


def test_callback_warns_before_the_longest_batch(tmp_path_factory):
    """On a simulated device between the measured steps' peak and the projected peak of the 160-token batch still
    to come, the callback warns with both numbers before that batch runs (the run stops at 3 steps, before it)."""
    cb, _, text = _run("Trainer", tmp_path_factory)
    measured = cb.comparison["measured"]["peak_bytes"]
    proj = cb.comparison["projection"]
    assert measured < proj["limit_bytes"] < proj["projected_bytes"]
    assert proj["projected_bytes"] == pytest.approx(_estimate(2, 160) * measured / _estimate(2, 48), rel=0.01)
    warning = [w for w in cb.warnings if "projected to need" in w]
    assert len(warning) == 1 and "2 × 160 tokens" in warning[0] and "will run out of memory" in warning[0]
    assert warning[0] in text


def test_spec_from_a_quantized_live_model_and_errors_never_stop_training(tmp_path):
    """The TrainSpec read from a model's bitsandbytes config (as from_pretrained stores it) and PEFT config; and a
    run memplan cannot model (an optimizer without a formula) turns the callback off instead of failing."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from memplan.integrations.transformers import MemplanCallback, spec_from_live

    model = _model()
    model.config.quantization_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                        "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float16"}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, optim="paged_adamw_8bit",
                             use_cpu=True, report_to="none")
    spec = spec_from_live(model, args, 700)
    # the embeddings are fp32 while the base model is "4-bit": prepare_model_for_kbit_training's upcast
    assert (spec.bits, spec.quant_type, spec.double_quant, spec.compute_dtype, spec.upcast, spec.optimizer,
            spec.batch_size, spec.seq_len) == (4, "fp4", False, "fp16", True, "paged-adamw-8bit", 3, 700)
    # Liger through the Trainer (its fused linear cross-entropy unless the config turns it off, as SFTTrainer does)
    args.use_liger_kernel = True
    assert (spec_from_live(model, args, 700).liger, spec_from_live(model, args, 700).loss) == (True, "liger")
    args.liger_kernel_config = {"fused_linear_cross_entropy": False}
    assert spec_from_live(model, args, 700).loss == "standard"
    cb = MemplanCallback(output_dir=str(tmp_path / "p"))
    bad = TrainingArguments(output_dir=str(tmp_path), optim="adagrad", use_cpu=True, report_to="none")
    cb.on_train_begin(bad, TrainerState(), TrainerControl(), model=_model(), train_dataloader=None)
    assert "adagrad" in str(cb.disabled) and cb.tracker is None and not cb.hooks
    cb.on_step_begin(bad, TrainerState(), TrainerControl())  # off: does nothing, raises nothing
    cb.on_train_end(bad, TrainerState(), TrainerControl())
    assert cb.path is None


class _TrackerAsCuda:
    """torch.cuda's memory counters read off memplan's CPU live-bytes tracker, started where the callback starts its
    own (on_train_begin, the model registered): the callback's CUDA branch then runs on the CPU, on the same bytes
    its CPU branch measures. Reserved is the allocated peak rounded up to 2 MiB segments, a stand-in."""

    def __init__(self, budget):
        from memplan.trace.tracker import LiveBytesTracker

        self.tracker = LiveBytesTracker(None, keep_timeline=False)
        self.tracker.phase = "cuda"
        self.budget = budget

    def start(self, model):
        from memplan.trace.attribution import register_model

        register_model(self.tracker, model)
        self.tracker.__enter__()
        self.reset_peak_memory_stats()

    def stop(self):
        self.tracker.__exit__(None, None, None)
        self.tracker.stop()

    def max_memory_allocated(self, *_):
        return max(self.tracker.phase_peaks.get("cuda", 0), self.tracker.current)

    def memory_allocated(self, *_):
        return self.tracker.current

    def max_memory_reserved(self, *_):
        return -(-self.max_memory_allocated() // 2**21) * 2**21

    def reset_peak_memory_stats(self, *_):
        self.tracker.phase_peaks["cuda"] = self.tracker.current

    def synchronize(self, *_):
        pass

    def get_device_properties(self, *_):
        from types import SimpleNamespace

        return SimpleNamespace(total_memory=self.budget)


def test_the_cuda_branch_records_what_the_cpu_branch_does(tmp_path_factory, tmp_path, monkeypatch):
    """No GPU here: the callback's CUDA branch (torch.cuda's max_memory_allocated / reserved per phase, reset at each
    boundary) runs on the CPU with those counters read off the live-bytes tracker. Its per-phase peaks equal the CPU
    branch's on the same run, reserved is reported beside them, the projection scales by reserved / allocated, and
    the profile says cuda."""
    from memplan.integrations import transformers as integration
    from memplan.integrations.transformers import MemplanCallback

    cpu_cb, _, _ = _run("Trainer", tmp_path_factory)
    fake = _TrackerAsCuda(cpu_cb.device_bytes)
    for name in ("max_memory_allocated", "memory_allocated", "max_memory_reserved", "reset_peak_memory_stats",
                 "synchronize", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(integration, "_device_kind", lambda param: "cuda")
    cb = MemplanCallback(output_dir=str(tmp_path / "profiles"))
    begin = cb.on_train_begin

    def on_train_begin(args, state, control, model=None, **kw):
        fake.start(model)
        return begin(args, state, control, model=model, **kw)

    monkeypatch.setattr(cb, "on_train_begin", on_train_begin)
    try:
        _train("Trainer", tmp_path, cb)
    finally:
        fake.stop()
    assert cb.device == "cuda" and not cb.disabled
    cuda, cpu = cb.comparison["measured"], cpu_cb.comparison["measured"]
    assert cuda["phases"] == cpu["phases"] and cuda["shape"] == cpu["shape"]
    assert cuda["reserved_peak_bytes"] == -(-cuda["peak_bytes"] // 2**21) * 2**21
    proj = cb.comparison["projection"]
    assert proj["projected_device_bytes"] == int(proj["projected_bytes"] * cuda["reserved_peak_bytes"]
                                                 / cuda["peak_bytes"])
    prof = read_profile(next((tmp_path / "profiles").glob("*.json")))
    assert prof["run"]["device"] == "cuda" and prof["measurements"]["peak"]["measure"] == "allocated_peak_bytes"
    assert prof["measurements"]["peak"]["reserved_bytes"] == cuda["reserved_peak_bytes"]
    assert any("reserved/allocated" in w for w in cb.warnings)  # the 160-token batch, over the same device
