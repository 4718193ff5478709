"""Named shared-memory arenas: arrays cross processes as ``ArrayRef``s, read as zero-copy views.

One process owns (creates, writes, unlinks) an arena; others attach read-only by name. Arrays
are written at increasing offsets and the write position wraps around, so a reader must be done
with a view before the writer laps it (the protocol's request/reply rhythm guarantees it: one
step's arrays are consumed before the next step's are written).

Segment names start with ``dovetail_<owner pid>_<PID namespace>_``, so
``remove_orphaned_segments`` can find and delete what a crashed owner left in /dev/shm.
"""

from __future__ import annotations

import os
import secrets
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

from dovetail.protocol.messages import ArrayRef

PREFIX = "dovetail_"
ALIGN = 64


SHM_ROOT = "/dev/shm"


def _check_room(size: int) -> None:
    """Refuse, with a clear error, a segment /dev/shm has no room for: its pages are only taken
    when first touched, and a full /dev/shm then kills the process with SIGBUS."""
    try:
        stat = os.statvfs(SHM_ROOT)
    except OSError:
        return  # no /dev/shm to ask (another platform): let the allocation decide
    free = stat.f_bavail * stat.f_frsize
    if size > free:
        raise MemoryError(f"{SHM_ROOT} has {free / 2**20:.1f} MiB free, a shared-memory arena needs "
                          f"{size / 2**20:.1f} MiB: free some (or enlarge it, e.g. docker --shm-size)")


class ShmArena:
    def __init__(self, size: int = 1 << 20, name: str | None = None):
        """Create an arena of ``size`` bytes (owner), or attach to the existing ``name`` (reader)."""
        self.owner = name is None
        if self.owner:
            _check_room(size)
            name = owned_name(PREFIX)
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        else:
            self._shm = shared_memory.SharedMemory(name=name)
            # Readers must not let Python's resource tracker unlink the owner's segment at exit
            # (unless the owner is this very process: its registration is the owner's).
            if _owner_pid(name) != os.getpid():
                resource_tracker.unregister(self._shm._name, "shared_memory")
        self.name = name
        self.size = self._shm.size
        self._cursor = 0

    def put(self, array) -> ArrayRef:
        """Copy ``array`` into the arena (owner only) and return its reference."""
        if not self.owner:
            raise PermissionError("only the owner writes into an arena")
        array = np.ascontiguousarray(array)
        if array.nbytes > self.size:
            raise ValueError(f"array of {array.nbytes} bytes does not fit an arena of {self.size}")
        start = -(-self._cursor // ALIGN) * ALIGN
        if start + array.nbytes > self.size:
            start = 0
        np.ndarray(array.shape, array.dtype, buffer=self._shm.buf, offset=start)[...] = array
        self._cursor = start + array.nbytes
        return ArrayRef(self.name, start, array.dtype.str, list(array.shape))

    def view(self, ref: ArrayRef) -> np.ndarray:
        """A read-only zero-copy numpy view of ``ref`` (which must point into this arena)."""
        if ref.segment != self.name:
            raise ValueError(f"reference into {ref.segment!r}, not this arena {self.name!r}")
        dtype = np.dtype(ref.dtype)
        nbytes = dtype.itemsize * int(np.prod(ref.shape, dtype=np.int64))
        if ref.offset < 0 or ref.offset + nbytes > self.size:
            raise ValueError(f"reference outside the arena: offset {ref.offset}, {nbytes} bytes")
        out = np.ndarray(tuple(ref.shape), dtype, buffer=self._shm.buf, offset=ref.offset)
        out.flags.writeable = False
        return out

    def close(self) -> None:
        """Detach; the owner also unlinks the segment. Views must be dropped first."""
        if self._shm is None:
            return
        try:
            self._shm.close()
        except BufferError:  # a view is still alive: leave the mapping, still unlink below
            pass
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
        self._shm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArenaReader:
    """Zero-copy views of arrays that other processes put in their arenas; attaches to each
    arena once, on first use."""

    def __init__(self):
        self._arenas: dict[str, ShmArena] = {}

    def view(self, ref: ArrayRef) -> np.ndarray:
        arena = self._arenas.get(ref.segment)
        if arena is None:
            arena = self._arenas[ref.segment] = ShmArena(name=ref.segment)
        return arena.view(ref)

    def close(self) -> None:
        for arena in self._arenas.values():
            arena.close()
        self._arenas.clear()


def segment_names(shm_dir: str = "/dev/shm") -> set[str]:
    """The Dovetail shared-memory segments that exist now."""
    return {path.name for path in Path(shm_dir).glob(f"{PREFIX}*")}


def remove_orphaned_segments(shm_dir: str = "/dev/shm") -> list[str]:
    """Delete Dovetail segments whose owner process no longer exists; return their names."""
    return remove_orphans(Path(shm_dir), PREFIX, lambda path: path.unlink(missing_ok=True))


def owned_name(prefix: str) -> str:
    """A fresh name that records its creator, ``<prefix><pid>_<PID namespace>_<random>``, so that
    ``remove_orphans`` can find what a crashed owner left behind."""
    return f"{prefix}{os.getpid()}_{PID_NAMESPACE}_{secrets.token_hex(4)}"


def remove_orphans(directory: Path, prefix: str, remove) -> list[str]:
    """``remove(path)`` each entry of ``directory`` named by ``owned_name(prefix)`` whose owner
    process no longer exists; return their names.

    A name records its owner's pid *and PID namespace*: /dev/shm (or a home directory) may be
    shared with a container whose processes this one cannot see, and a pid that looks dead from
    here may be a live engine there. Only names of this namespace are swept."""
    removed = []
    for path in directory.glob(f"{prefix}*"):
        pid, namespace = _owner(path.name[len(prefix):])
        if pid is not None and namespace in (PID_NAMESPACE, None) and not pid_alive(pid):
            remove(path)
            removed.append(path.name)
    return removed


def _pid_namespace() -> str:
    try:
        return format(os.stat("/proc/self/ns/pid").st_ino, "x")
    except OSError:
        return "0"


PID_NAMESPACE = _pid_namespace()


def _owner(name: str) -> tuple[int | None, str | None]:
    """(owner pid, its PID namespace) from a name without its prefix (namespace None: an older
    name without it)."""
    fields = name.split("_")
    try:
        pid = int(fields[0])
    except ValueError:
        return None, None
    return pid, (fields[1] if len(fields) == 3 else None)


def _owner_pid(name: str) -> int | None:
    return _owner(name[len(PREFIX):])[0]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
