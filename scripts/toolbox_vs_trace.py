"""Estimate vs meta trace for each #11 technique on a 4-layer Llama with real proportions (h 512, GQA 4:1,
MLP 2.75 h, V 16k), seq 1024: the figures quoted in docs/toolbox.md.

    python scripts/toolbox_vs_trace.py [SEQ]
"""
from __future__ import annotations

import logging
import sys

from memplan.architectures import from_hf_config
from memplan.estimate import estimate
from memplan.spec import TrainSpec
from memplan.stack import describe, stack
from memplan.trace import run_trace

MID = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
       "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 16000, "max_position_embeddings": 4096,
       "tie_word_embeddings": False}
CASES = [
    {}, {"attention": "flash_attention_2"}, {"attention": "flash_attention_2", "gradient_checkpointing": False},
    {"activation_offload": "checkpoints"}, {"activation_offload": "all"},
    {"activation_offload": "all", "gradient_checkpointing": False}, {"loss": "liger"},
    {"loss": "cce", "upcast": False}, {"liger": True, "gradient_checkpointing": False}, {"bits": 8},
    {"optimizer": "adafactor"}, {"optimizer": "paged-adamw"},
]


def main() -> int:
    logging.disable(logging.WARNING)
    seq = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    model = from_hf_config(MID, "llama-4L-h512", "scripts/toolbox_vs_trace.py")
    print(f"stack: {describe(stack(0))}; QLoRA defaults, seq {seq}; MiB = 2^20 bytes")
    print(f"{'change':58} {'trace MiB':>10} {'est MiB':>9} {'error':>7} {'host MiB (trace / est)':>24}")
    for case in CASES:
        train = TrainSpec(seq_len=seq, **case)
        t = run_trace(model, train, keep_timeline=False)
        e = estimate(model, train)
        err = (e.peak_bytes - t.peak_bytes) / t.peak_bytes * 100
        host = (f"{t.host.get('host_peak_bytes', 0) / 2**20:.1f} / {e.host['offloaded_activations_bytes'] / 2**20:.1f}"
                if train.activation_offload != "off" else "")
        print(f"{str(case or 'defaults'):58} {t.peak_bytes / 2**20:10.1f} {e.peak_bytes / 2**20:9.1f} "
              f"{err:+6.2f}% {host:>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
