"""The model layer: config, transformer, kernels, hooks, the Forward seam, checkpoints."""
