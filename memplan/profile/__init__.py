"""Real profiles: N real QLoRA/LoRA training steps on CUDA or the CPU, measured per phase (docs/profile.md).

    memplan.profile.grid      run_grid / run_one: one child process per configuration, resumable, CSV log
    memplan.profile.child     the child process: `python -m memplan.profile.child JOB.json`
    memplan.profile.runner    load (from_pretrained or direct), recipe, steps, per-phase measurement, the profile
    memplan.profile.loading   from_pretrained with BitsAndBytesConfig; meta-init + per-layer random init (--load direct)
    memplan.profile.weights   random-weight safetensors checkpoints, written shard by shard, cached by config hash
    memplan.profile.measure   NVML / RSS samplers, OOM message parsing
    memplan.profile.compare   measured vs memplan.estimate and memplan.trace
    memplan.profile.schema    the memplan.profile/1 JSON file (atomic write, validating read) and the CSV log
    memplan.profile.env       GPUs (NVML), driver, library versions, catalog match

Importing this package imports no torch.
"""
