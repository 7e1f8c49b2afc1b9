"""MemplanCallback in a real Trainer run on the GPU: the callback's CUDA branch (torch.cuda's allocated / reserved
peaks per phase, the estimate beside them, the projection for the longest batch still to come) and its profile.

    python scripts/gpu_callback.py OUTDIR [--device cuda|cpu] [--model llama-3.2-1b] [--steps 4]

The model is built from the catalog's config with random weights (no download), bf16 on CUDA, LoRA r 16 on q/v,
gradient checkpointing, batch 2 of 512-token rows then one 2048-token row last (sequential order: it comes after
the compared steps, so the callback projects it). Writes OUTDIR/callback/ (the profile JSON and callback.log).
--device cpu is a dry run of the same logic on the CPU tracker with a 2-layer cut of the model.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    from memplan.catalog import resolve_model
    from memplan.integrations.transformers import MemplanCallback

    out = Path(a.outdir) / "callback"
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=out / "callback.log", level=logging.INFO, format="%(message)s")
    logging.getLogger().addHandler(logging.StreamHandler(sys.stdout))
    spec = resolve_model(a.model)
    cfg = {k: v for k, v in spec.hf_config.items() if k not in ("auto_map", "quantization_config")}
    cuda = a.device == "cuda"
    if not cuda:  # the dry run: two layers
        cfg["num_hidden_layers"] = 2
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.name_or_path = spec.name
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    short, long_ = (512, 2048) if cuda else (64, 256)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, config.vocab_size, (n,), generator=g).tolist()}
            for n in [short] * (2 * a.steps) + [long_]]

    def collate(feats):
        m = max(len(f["input_ids"]) for f in feats)
        ids = torch.tensor([f["input_ids"] + [0] * (m - len(f["input_ids"])) for f in feats])
        return {"input_ids": ids, "labels": ids.clone()}

    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2, max_steps=a.steps,
                             use_cpu=not cuda, bf16=cuda, optim="adamw_torch", report_to="none",
                             gradient_checkpointing=True, save_strategy="no", train_sampling_strategy="sequential",
                             logging_steps=1)
    cb = MemplanCallback(output_dir=str(out), model_name=spec.name)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[cb]).train()
    summary = {"device": cb.device, "comparison": cb.comparison, "warnings": cb.warnings,
               "profile": str(getattr(cb, "path", ""))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"gpu_callback: {cb.device}, profile {summary['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
