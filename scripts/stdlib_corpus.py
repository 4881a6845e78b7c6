"""Build a few-MB text corpus from the Python standard library's own source files: no download,
every machine with Python has one.

Rules:
- The ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, in the order of their relative
  paths' SHA-256 (a fixed shuffle, so the held-out tail is a mix of packages), skipping test
  suites (``test``/``tests``/``idle_test`` folders), ``site-packages`` and files that are not
  valid UTF-8; each is preceded by a ``# file: <relative path>`` line. Files are added whole
  until the corpus reaches ``--mb`` MiB.
- The same Python release gives the same bytes (the sidecar JSON records the release, the byte
  count, the files and a SHA-256), so runs on it can be compared; another release gives another
  corpus.
- Written to ``results/corpora/`` by default (git-ignored: built, never committed). Train on it
  with ``protocols/olsson2022/stdlib_bytes_2layer.yaml`` (run from the repository root).

    python scripts/stdlib_corpus.py [--mb 4] [--out results/corpora/stdlib_py.txt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def sources(root: Path) -> list[Path]:
    found = [p for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts[:-1])]
    return sorted(found, key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())


def build(out: Path, mb: float) -> dict:
    root = Path(sysconfig.get_paths()["stdlib"])
    budget = int(mb * 2**20)
    parts, used, size = [], [], 0
    for path in sources(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunk = f"# file: {path.relative_to(root)}\n{text}\n".encode("utf-8")
        parts.append(chunk)
        used.append(str(path.relative_to(root)))
        size += len(chunk)
        if size >= budget:
            break
    data = b"".join(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    meta = {"python": sys.version.split()[0], "stdlib": str(root), "bytes": len(data), "files": len(used),
            "sha256": hashlib.sha256(data).hexdigest()}
    Path(f"{out}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MiB (default 4)")
    parser.add_argument("--out", default="results/corpora/stdlib_py.txt")
    args = parser.parse_args()
    print(json.dumps(build(Path(args.out), args.mb)))


if __name__ == "__main__":
    main()
