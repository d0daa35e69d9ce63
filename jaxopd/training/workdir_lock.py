"""One run per workdir: an exclusive advisory lock on `workdir/.lock`, held for the run's life.

The file names its holder (host, pid, start time) so a second run can say who has the workdir. The lock itself is a
`flock` on the file, which the kernel drops when the holder exits in any way (a crash, SIGKILL), so a file left with
a holder's name but no lock held is stale and is taken over with a message. The file is emptied, never deleted, on
release: deleting it would let two runs lock two different files of the same name.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
from typing import Iterator


class WorkdirLockedError(RuntimeError):
    pass


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path, *, enabled: bool = True, process_count: int = 1) -> Iterator[None]:
    """Holds the lock on `workdir` (created if missing) for the `with` body; raises WorkdirLockedError naming the
    holder when another run has it. enabled=False (processes other than 0 of a multi-process run) takes nothing;
    with process_count > 1 every process learns whether process 0 got the lock and raises with it when not, so a
    refused multi-process run ends everywhere instead of leaving the others waiting in a collective."""
    if not enabled:
        if process_count > 1 and not _agree(True):
            raise WorkdirLockedError(f"{workdir} is in use by another run (process 0 could not lock it)")
        yield
        return
    held = contextlib.ExitStack()
    try:
        held.enter_context(_locked(workdir))
    except WorkdirLockedError:
        if process_count > 1:
            _agree(False)
        raise
    with held:
        if process_count > 1:
            _agree(True)
        yield


def _agree(locked: bool) -> bool:
    """Process 0's `locked`, on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(locked)))


@contextlib.contextmanager
def _locked(workdir: str | pathlib.Path) -> Iterator[None]:
    path = pathlib.Path(workdir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLockedError(
                f"{workdir} is in use by another run ({_describe(_read(descriptor))}): wait for it to finish or stop "
                "it, or give this run another --config.workdir") from None
        previous = _read(descriptor)
        if previous:
            print(f"taking over the stale lock {path} of a run that ended without releasing it "
                  f"({_describe(previous)})", flush=True)
        _write(descriptor, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                       "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        try:
            yield
        finally:
            _write(descriptor, "")
    finally:
        os.close(descriptor)  # drops the flock


def _read(descriptor: int) -> dict:
    os.lseek(descriptor, 0, os.SEEK_SET)
    text = os.read(descriptor, 4096).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"holder": text}


def _write(descriptor: int, text: str) -> None:
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(descriptor, text.encode())


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    if "pid" not in holder:
        return holder.get("holder", str(holder))
    alive = ""
    if holder.get("host") == socket.gethostname():
        alive = ", running" if _pid_alive(int(holder["pid"])) else ", no longer running"
    return f"host {holder.get('host')}, pid {holder['pid']}{alive}, started {holder.get('started')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
