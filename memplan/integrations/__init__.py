"""Inputs users already have: trainer configs, datasets, and a live Trainer.

    config.py        `--from FILE`: read a trainer config into TrainSpec settings (format detection, the mapping
                     record, type checks, overrides by command-line flags)
    axolotl.py  llamafactory.py  trl.py  torchtune.py   one reader per trainer's config schema
    dataset.py       `--dataset FILE --tokenizer PATH`: token lengths and the per-step shapes the trainer builds
    transformers.py  MemplanCallback: a transformers.TrainerCallback that estimates, measures and writes a profile

Everything but transformers.py is torch-free (`memplan estimate --from` must not import torch).
"""
