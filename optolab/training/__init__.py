"""Training: trainer, run bookkeeping, run directories, summaries, the compiled path and ensembles."""
