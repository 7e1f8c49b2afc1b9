"""MemplanCallback on a GPU: a real QLoRA fine-tune with transformers' Trainer (or TRL's SFTTrainer) of a model
built from its config with random weights (memory does not depend on the values), and the callback's measured vs
estimated memory per phase. Prepared for a GPU machine; it has not been run on one yet (no figure is claimed).

    python scripts/gpu_callback_check.py [--model llama-3.2-1b] [--seq 1024] [--batch 4] [--trainer sft]
        [--out reports/callback]

Prints the callback's comparison and writes its memplan profile under --out, for `memplan calibrate` and
`memplan validate --against profiles`.
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
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--trainer", choices=("trainer", "sft"), default="trainer")
    ap.add_argument("--out", default="reports/callback")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    from memplan.catalog import resolve_model
    from memplan.integrations.transformers import MemplanCallback

    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    spec = resolve_model(a.model)
    cfg = AutoConfig.for_model(**spec.hf_config)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    # random weights, saved and loaded the way users load (from_pretrained + BitsAndBytesConfig)
    folder = Path(a.out) / "weights" / a.model
    if not (folder / "config.json").is_file():
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    # mostly short rows and one long one, last: the callback must warn about it before it comes
    lengths = [a.seq // 4] * (a.batch * (a.steps + 2)) + [a.seq]
    rows = [{"input_ids": torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()} for n in lengths]

    def collate(feats):
        m = max(len(f["input_ids"]) for f in feats)
        ids = torch.tensor([f["input_ids"] + [0] * (m - len(f["input_ids"])) for f in feats])
        return {"input_ids": ids, "labels": ids.clone()}

    common = dict(output_dir=str(Path(a.out) / "run"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                  bf16=True, optim="paged_adamw_8bit", gradient_checkpointing=True, report_to="none",
                  save_strategy="no", train_sampling_strategy="sequential", logging_steps=1)
    cb = MemplanCallback(output_dir=str(Path(a.out) / "profiles"))
    if a.trainer == "trainer":
        Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows, data_collator=collate,
                callbacks=[cb]).train()
    else:
        from datasets import Dataset
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models
        from trl import SFTConfig, SFTTrainer

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2,
                                                                                   "<unk>": 3}, unk_token="<unk>")),
                                      pad_token="<pad>", eos_token="</s>", bos_token="<s>")
        SFTTrainer(model=model, args=SFTConfig(**common, max_length=a.seq), train_dataset=Dataset.from_list(rows),
                   processing_class=tok, callbacks=[cb]).train()
    print(json.dumps({"comparison": cb.comparison, "warnings": cb.warnings, "profile": str(cb.path),
                      "device": torch.cuda.get_device_name(0)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
