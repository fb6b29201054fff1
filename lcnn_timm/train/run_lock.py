"""One writer per run folder: an exclusive ``flock`` on ``<output>/.lock``, held while the run writes.

Two runs into one folder overwrote each other's ``ckpt-N`` files and ``last.json`` (issue 25). The kernel drops a
``flock`` when its process dies, however it dies, so the lock of a killed run is free again at once: no stale-lock
clean-up is needed, and the holder's PID in the file is only there to name it in the message.
"""
import fcntl
import os
from pathlib import Path
from typing import List, Optional

__all__ = ["RunFolderBusy", "RunLock"]


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """Exclusive lock on a run folder (created if needed); :meth:`release` or process exit frees it."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / ".lock"
        self._fd: Optional[int] = None
        # the folders acquire() made, deepest first (release(discard=True) removes them): the run folder and any
        # missing parents, so a refused "--output new/nested/run" leaves no "new/" behind
        self.created: List[Path] = []

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunFolderBusy` naming the process that holds it."""
        self.created = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"{self.directory} is in use by another lcnn-timm train (pid {holder}): two runs would overwrite "
                "each other's checkpoints. Give this run another output/experiment, or wait for that one to end"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self, discard: bool = False) -> None:
        """Free the lock (the file stays; an unlocked file means a free folder). ``discard``: a run refused before
        it wrote anything leaves nothing behind, so a folder :meth:`acquire` created and that holds only the lock
        file is removed (the file first, while still locked), with the parents it created."""
        if self._fd is None:
            return
        if discard and self.created and [p.name for p in self.directory.iterdir()] == [self.path.name]:
            self.path.unlink()
            for folder in self.created:  # each is empty once the one below it is gone
                try:
                    folder.rmdir()
                except OSError:  # something else was put there meanwhile: it stays, and so do its parents
                    break
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
