"""The Python API, mirroring the CLI, for notebooks::

    import optolab
    protocol = optolab.load_protocol("protocols/quickstart.yaml", seed=1)
    run = optolab.run(protocol, out="results/quickstart_s1")
    run.metrics                 # tidy pandas DataFrame
    run.summary["time_to_loss_0.5"]
    model = run.nnsight()       # the trained model wrapped in nnsight.NNsight
    with model.trace(*run.eval_batch().inputs):
        pattern = model.blocks[1].attn.hook_pattern.output.save()

``open_run(path)`` opens any finished or unfinished run directory.
"""

from optolab.experiments.runs import Run, default_out, open_run, run
from optolab.protocol.loader import load_protocol

__all__ = ["Run", "default_out", "load_protocol", "open_run", "run"]
