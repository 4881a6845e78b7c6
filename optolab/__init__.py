"""optolab: train small transformers on synthetic tasks while clamp protocols intervene.

The notebook API mirrors the CLI: ``load_protocol``, ``run``, ``open_run`` (see
:mod:`optolab.api`). Lower-level pieces live in modules named after what they are:
``model``, ``tasks``, ``protocol``, ``trainer``, ``measures``, ``plots``.
"""

from optolab.api import Run, open_run, run
from optolab.errors import OptolabError
from optolab.loader import load_protocol

__version__ = "0.1.0"
__all__ = ["OptolabError", "Run", "__version__", "load_protocol", "open_run", "run"]
