"""POSIX shared-memory segments owned by dpinfer, and their hygiene.

Every segment is named by ``dpinfer.config.shm_name(deployment_id, rank, ...)`` (prefix
``dpinfer-``) and starts with a 64-byte header: magic, layout version, the creator's pid,
the payload size. The creator unlinks its segment at clean exit; a survivor or the next
start cleans up after a killed creator with ``cleanup_stale_segments``, which only removes
segments whose creator pid is dead, so it never touches a live process's memory.

We map ``/dev/shm`` objects with ``_posixshmem`` + ``mmap`` instead of
``multiprocessing.shared_memory``: on Python 3.11 the latter registers every segment with
the resource tracker, which then warns about or double-unlinks segments another process owns.
"""

from __future__ import annotations

import _posixshmem
import mmap
import os
import re
import struct
from dataclasses import dataclass

from dpinfer.config import SHM_PREFIX
from dpinfer.log import get_logger

logger = get_logger(__name__)

MAGIC = b"DPINFSHM"
LAYOUT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")  # magic, version, creator pid, payload bytes
SHM_DIR = "/dev/shm"
# Segments made by code that cannot write our header may embed the creator pid in the name.
_PID_IN_NAME = re.compile(r"-p(\d+)(?:-|$)")


def pid_alive(pid: int) -> bool:
    """True unless ``pid`` certainly does not exist (a pid we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Segment:
    """One mapped segment. ``buf`` is the payload after the header (page-aligned when the
    caller asks for ``header_bytes`` of a page)."""

    name: str
    mm: mmap.mmap
    fd: int
    payload_offset: int
    payload_bytes: int
    creator_pid: int
    owner: bool

    def close(self) -> None:
        """Unmap (best effort: views still handed out keep the mapping alive) and close the fd."""
        try:
            self.mm.close()
        except BufferError:
            # Live tensor views still point into the mapping; it goes away with them.
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def unlink(self) -> None:
        unlink_segment(self.name)


def create_segment(name: str, payload_bytes: int, header_bytes: int = HEADER_BYTES) -> Segment:
    """Create ``/dev/shm/<name>`` (exclusively), write the header and pre-fault every page.

    A same-named segment left by a dead creator is removed first; one whose creator is alive
    raises ``FileExistsError`` (two live owners of one name is a naming bug).
    """
    assert header_bytes >= HEADER_BYTES
    stale = read_creator_pid(name)
    if stale is not None:
        if pid_alive(stale) and stale != os.getpid():
            raise FileExistsError(f"shared-memory segment {name} is owned by live pid {stale}")
        unlink_segment(name)
    total = header_bytes + payload_bytes
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, total)
        mm = _map(fd, total)
    except BaseException:
        os.close(fd)
        unlink_segment(name)
        raise
    mm[:HEADER_BYTES] = _HEADER.pack(MAGIC, LAYOUT_VERSION, os.getpid(), payload_bytes).ljust(
        HEADER_BYTES, b"\0"
    )
    return Segment(name, mm, fd, header_bytes, payload_bytes, os.getpid(), owner=True)


def open_segment(name: str, header_bytes: int = HEADER_BYTES) -> Segment:
    """Map an existing segment made by ``create_segment``; ``FileNotFoundError`` if absent."""
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        size = os.fstat(fd).st_size
        if size < header_bytes:
            raise ValueError(f"shared-memory segment {name} is not a dpinfer segment")
        mm = _map(fd, size)
    except BaseException:
        os.close(fd)
        raise
    magic, version, pid, payload = _HEADER.unpack_from(mm, 0)
    if magic != MAGIC or version != LAYOUT_VERSION or payload + header_bytes > size:
        mm.close()
        os.close(fd)
        raise ValueError(f"shared-memory segment {name} has an unknown layout")
    return Segment(name, mm, fd, header_bytes, payload, pid, owner=False)


def unlink_segment(name: str) -> bool:
    """Remove the name (mappings stay valid until unmapped). False if it was already gone."""
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return False
    return True


def read_creator_pid(name: str) -> int | None:
    """The creator pid from the header (or ``-p<pid>`` in the name); None if unknown/absent."""
    try:
        with open(os.path.join(SHM_DIR, name), "rb") as f:
            head = f.read(_HEADER.size)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    if len(head) == _HEADER.size:
        magic, _version, pid, _payload = _HEADER.unpack(head)
        if magic == MAGIC:
            return int(pid)
    match = _PID_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def list_segments(deployment_id: str | None = None) -> list[str]:
    """Names of ``dpinfer-`` segments in /dev/shm (of one deployment when given)."""
    prefix = f"{SHM_PREFIX}-" if deployment_id is None else f"{SHM_PREFIX}-{deployment_id}-"
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:  # no /dev/shm listing on this platform
        return []
    return sorted(n for n in names if n.startswith(prefix))


def cleanup_stale_segments(deployment_id: str | None = None) -> list[str]:
    """Unlink ``/dev/shm/dpinfer-*`` segments whose creator pid is dead; return their names.

    Segments without a recognisable creator pid are left alone, as are segments of live
    processes. Safe to call at any time from any process.
    """
    removed = []
    for name in list_segments(deployment_id):
        pid = read_creator_pid(name)
        if pid is None or pid_alive(pid):
            continue
        if unlink_segment(name):
            removed.append(name)
    if removed:
        logger.info("removed %d stale shared-memory segment(s): %s", len(removed), ", ".join(removed))
    return removed


def _map(fd: int, size: int) -> mmap.mmap:
    # Populate every page now so the first real transfer does not pay for page faults
    # (NOTES §4: fresh pages make a 64 MiB transfer 5-10x slower).
    populate = getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate)
    if not populate:
        view = memoryview(mm)
        try:
            sum(view[i] for i in range(0, size, mmap.PAGESIZE))
        finally:
            view.release()
    return mm
