"""memplan's estimate vs IBM fms-acceleration's published A100-80GB measurements, under the stack they used.

    python scripts/compare_fms.py            # writes reports/fms_acceleration_comparison.csv, prints the table

Input: scripts/data/fms_acceleration_a100_80gb.json (their single-GPU rows, unchanged, with the commit they come
from and the stack of their requirements.txt: transformers 4.48.1, PEFT 0.13.2, bitsandbytes 0.43.3, torch 2.4.1,
flash-attn 2.7.3). Each row that memplan can express is estimated with the closest TrainSpec (mapping below) under
transformers 4 (their major) and, for contrast, transformers 5; the tensor peak is compared with their
torch.cuda.max_memory_allocated. Rows memplan cannot express are listed with the reason. Nothing is fitted to
these figures: README.md ("Against published measurements") explains each difference.

Mapping (their scenarios.yaml / defaults.yaml -> TrainSpec):
- every row: batch = per_device_train_batch_size, seq 4096 (packing to max_seq_len 4096), gradient checkpointing,
  AdamW (TrainingArguments' default adamw_torch), bf16 weights; attention flash_attention_2 when memplan has it,
  else sdpa (the closest: both fused O(s) kernels);
- framework "none", no peft: full fine-tuning in bf16 (--method full --bits 16);
- framework "none", peft lora: 16-bit LoRA, r 16, q/k/v/o, dropout 0.1, fp32 adapters (PEFT 0.13's default
  autocast_adapter_dtype=True);
- "baseline-peft-bnb": QLoRA NF4 + double quantization, bf16 compute; TRL 0.13's SFTTrainer runs
  prepare_model_for_kbit_training (upcast on) and then, with bf16=True, peft_module_casting_to_bf16, which
  makes the adapters bf16 (--lora-dtype bf16); r 16, q/k/v/o, dropout 0.1.
Not expressible: foak / accelerated-peft (fused triton kernels and the plugin's own preparation), GPTQ
(auto-gptq weights), gpt_bigcode-santacoder (no config in the catalog), runs without a measured allocation (OOM).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "scripts" / "data" / "fms_acceleration_a100_80gb.json"
OUT = ROOT / "reports" / "fms_acceleration_comparison.csv"
GIB = 2**30
MODELS = {"mistralai/Mistral-7B-v0.1": "mistral-7b-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1": "mixtral-8x7b",
          "NousResearch/Llama-2-70b-hf": "llama-2-70b"}
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def train_settings(row: dict) -> tuple[dict | None, str]:
    """(TrainSpec keyword arguments, '') for a row memplan can express, else (None, why not)."""
    from memplan.spec import ATTENTIONS

    fw, peft = row["framework_config"], row["peft_method"]
    if not row["mem_peak_torch_mem_alloc_in_bytes"]:
        return None, "no allocation figure (the run ran out of memory)"
    if row["model_name_or_path"] not in MODELS:
        return None, "model not in memplan's catalog (gpt_bigcode)" if "bigcode" in row["model_name_or_path"] \
            else "GPTQ weights (auto-gptq), not a bitsandbytes path"
    if fw not in ("none", "baseline-peft-bnb"):
        return None, f"{fw}: fms-acceleration's fused kernels / own model preparation"
    attention = "flash_attention_2" if "flash_attention_2" in ATTENTIONS else "sdpa"
    base = dict(batch_size=int(row["per_device_train_batch_size"]), seq_len=4096, gradient_checkpointing=True,
                optimizer="adamw", compute_dtype="bf16", attention=attention)
    if fw == "none" and not peft:
        return dict(base, method="full", bits=16), ""
    lora = dict(lora_r=int(row["r"]), lora_alpha=int(row["lora_alpha"]), lora_dropout=float(row["lora_dropout"]),
                lora_targets=QKVO)
    if fw == "none":
        return dict(base, **lora, bits=16, lora_dtype="fp32"), ""
    return dict(base, **lora, bits=4, quant_type="nf4", double_quant=True, upcast=True, lora_dtype="bf16"), ""


def main() -> int:
    from memplan.catalog import resolve_model
    from memplan.estimate import estimate
    from memplan.spec import TrainSpec
    from memplan.stack import stack

    data = json.loads(DATA.read_text())
    out = []
    for row in data["rows"]:
        settings, why = train_settings(row)
        rec = {"framework_config": row["framework_config"], "model": row["model_name_or_path"],
               "peft_method": row["peft_method"] or "full", "batch_size": row["per_device_train_batch_size"],
               "measured_max_allocated_gib": (round(int(row["mem_peak_torch_mem_alloc_in_bytes"]) / GIB, 3)
                                              if row["mem_peak_torch_mem_alloc_in_bytes"] else ""),
               "measured_nvidia_smi_gib": round(float(row["mem_nvidia_mem_reserved"]) / 1024, 3)}
        if settings is None:
            out.append({**rec, "compared": "no", "why_not": why})
            continue
        model = resolve_model(MODELS[row["model_name_or_path"]])
        measured = int(row["mem_peak_torch_mem_alloc_in_bytes"])
        rec.update(compared="yes", why_not="", memplan_model=model.name, attention=settings["attention"])
        for major in (4, 5):
            est = estimate(model, TrainSpec(**settings, transformers=major))
            rec[f"tf{major}_tensor_peak_gib"] = round(est.peak_bytes / GIB, 3)
            rec[f"tf{major}_error"] = round((est.peak_bytes - measured) / measured, 4)
            rec[f"tf{major}_peak_phase"] = est.peak_phase
            rec[f"tf{major}_device_total_gib"] = round(est.device_total_bytes / GIB, 3)
        rec["memplan_stack_tf4"] = " ".join(f"{p}={v}" for p, v in stack(4).items() if p != "source")
        rec["config"] = json.dumps(TrainSpec(**settings, transformers=4).to_dict(), sort_keys=True)
        out.append(rec)
    columns = list(dict.fromkeys(k for r in out for k in r))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(out)
    print(f"{'framework':18} {'model':38} {'peft':5} {'b':>2} {'measured':>9} {'tf4':>8} {'err':>7} {'tf5':>8} "
          f"{'err':>7}   (GiB: max_memory_allocated vs memplan tensor peak)")
    for r in out:
        if r["compared"] == "yes":
            print(f"{r['framework_config']:18} {r['model']:38} {r['peft_method']:5} {r['batch_size']:>2} "
                  f"{r['measured_max_allocated_gib']:9.2f} {r['tf4_tensor_peak_gib']:8.2f} {r['tf4_error']:+7.1%} "
                  f"{r['tf5_tensor_peak_gib']:8.2f} {r['tf5_error']:+7.1%}")
    skipped = sum(r["compared"] == "no" for r in out)
    print(f"{len(out) - skipped} rows compared, {skipped} not expressible (reasons in {OUT.relative_to(ROOT)}); "
          f"their stack: {data['their_stack']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
