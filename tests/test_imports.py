"""Importing optolab, ``optolab --help`` and the pytest plugin load no heavy library: they are
imported where used (timings: ``benchmarks/imports.py``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "pandas", "pyarrow", "matplotlib", "seaborn", "ray", "nnsight", "hypothesis")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(__import__('json').dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import optolab",
    "import optolab.cli\ntry:\n    optolab.cli.main(['--help'])\nexcept SystemExit:\n    pass",
    "import optolab.testing.pytest_plugin",
    "import optolab.api as api_module_is_heavy_on_purpose; del api_module_is_heavy_on_purpose",
])
def test_no_heavy_library_is_imported(code):
    loaded = _loaded_after(code)
    if "optolab.api" in code:  # the notebook API itself needs torch; the rest still loads lazily
        loaded = [m for m in loaded if m not in ("torch", "pandas", "pyarrow")]
    assert loaded == [], f"{code!r} imported {loaded}"


def test_the_lazy_names_resolve():
    import optolab

    assert callable(optolab.run) and callable(optolab.open_run) and callable(optolab.load_protocol)
    assert issubclass(optolab.OptolabError, Exception)
    with pytest.raises(AttributeError):
        optolab.no_such_name  # noqa: B018
