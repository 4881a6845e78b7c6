"""One writer per directory: an advisory lock held for a run's (or a sweep's) life.

Rules:
- The lock is ``DIR/.optolab.lock``, taken with ``flock`` (exclusive, non-blocking) and holding
  the holder's pid, host, start time and command. A second writer — another process, on this
  host or another that shares the file system and honours ``flock`` — gets one
  :class:`~optolab.core.errors.OptolabError` naming the holder (exit 2) and writes nothing.
- The kernel drops a ``flock`` when its holder dies, however it dies: a lock left by a dead
  process is simply taken over, and the file's old contents are replaced by the new holder's.
- Within one process the lock is re-entrant (a run taken over by ``--overwrite`` keeps the lock
  while it deletes and trains); it is released when the last holder releases it, or when the
  process ends.
- Only directories are locked, and only by optolab: the lock never blocks readers
  (``optolab report``, ``open_run``, ``plot``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from optolab.core.errors import OptolabError

LOCK_NAME = ".optolab.lock"
_held: dict[str, list] = {}  # real path of a lock file -> [open file, how many holders in this process]


def holder(directory: str | Path) -> dict | None:
    """What the lock file of ``directory`` says about its last holder (None: no lock file)."""
    try:
        return json.loads((Path(directory) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return None


class DirLock:
    """The lock of ``directory`` (created if missing), taken at construction; :meth:`release`
    (or leaving a ``with`` block) lets it go. ``what`` says what is being written, for messages."""

    def __init__(self, directory: str | Path, what: str = "run") -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptolabError(f"cannot create '{self.directory}': {e.strerror}.", field="--out",
                               fix="choose a folder you can write to.") from None
        path = self.directory / LOCK_NAME
        self.key = os.path.realpath(path)
        held = _held.get(self.key)
        if held is not None:
            held[1] += 1
            self.released = False
            return
        try:
            f = open(path, "a+")  # noqa: SIM115 - kept open for the lock's life
        except OSError as e:
            raise _cannot_open(path, e) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OptolabError(f"'{self.directory}' is being written by another optolab process "
                               f"({_describe(holder(self.directory))}).", field="--out",
                               fix=f"wait for that {what} to finish or stop it, or write to another folder.") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:300]}))
        f.flush()
        _held[self.key] = [f, 1]
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        held = _held.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _held[self.key]
            held[0].close()  # closing drops the flock

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _cannot_open(path: Path, err: OSError) -> OptolabError:
    """Why the lock file cannot be opened, naming what is at fault: the folder, or the file."""
    folder = path.parent
    if path.is_dir():
        return OptolabError(f"'{path}' is a folder, not optolab's lock file.", field="--out",
                            fix="move that folder out of the run directory, or choose another folder.")
    if not os.path.lexists(path):  # the file could not be created: the folder is at fault
        return OptolabError(f"cannot write in '{folder}': {err.strerror}.", field="--out",
                            fix="choose a folder you can write to.")
    return OptolabError(f"cannot open optolab's lock file '{path}' for writing: {err.strerror} (the folder "
                        f"itself is {'' if os.access(folder, os.W_OK) else 'not '}writable).", field="--out",
                        fix=f"make it writable (chmod u+w '{path}'), or delete it if no optolab process writes "
                            "there; it holds only the last writer's pid.")


def _describe(h: dict | None) -> str:
    if not h:
        return "holder unknown"
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')}: {h.get('command', '?')}"
