"""cst.core: the model and what trains it, over the native kernels (cst._core): ModelConfig, Model,
ops, LoRA, the losses, AdamW, LR schedules, generation, threads/SIMD, seeds, atomic files, errors.
Imports nothing from the other layers (io, data, train, eval, cli)."""
