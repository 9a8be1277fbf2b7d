"""Checkpoints of a long distillation: written atomically by one process, the newest read back to resume.

A checkpoint is a dict of tensors, numbers and strings saved with ``torch.save`` and read with
``weights_only=True``: resuming never runs code from a file. Files are named
``step-00001000.pt`` in their folder; each is written to a temporary file beside it and renamed
into place, so a run killed while writing leaves the previous checkpoint whole.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidOptionError, OutputExistsError
from .outputs import write_atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d+)\.pt$")


class Checkpoints:
    """Where and how often :func:`convtool.distill` saves its state, and whether it resumes.

    Args:
        folder: the checkpoint folder (created if missing).
        every: save after every ``every`` steps (and after the last step); 0 saves only at the end.
        resume: continue from the newest checkpoint in ``folder`` (from step 0 when it holds none).
        force: without ``resume``, start over in a folder that holds checkpoints (they are removed).
        keep: how many of the newest checkpoints to keep.

    Raises:
        OutputExistsError: ``folder`` holds checkpoints and neither ``resume`` nor ``force`` is set.
        InvalidOptionError: ``folder`` is a file, or ``every`` or ``keep`` is negative / zero.

    Example:
        >>> convtool.distill(student, teacher, data, steps=10_000,
        ...                  checkpoints=Checkpoints("ckpt/", every=500, resume=True))
    """

    def __init__(self, folder: str | os.PathLike, *, every: int = 0, resume: bool = False, force: bool = False,
                 keep: int = 2) -> None:
        self.folder, self.every, self.resume, self.keep = Path(folder), every, resume, keep
        if every < 0 or keep < 1:
            raise InvalidOptionError("the checkpoint interval must be 0 or more and at least one checkpoint kept")
        if self.folder.exists() and not self.folder.is_dir():
            raise InvalidOptionError(f"--checkpoint-dir {self.folder} is a file, not a folder")
        if self.found() and not resume and not force:
            raise OutputExistsError(f"--checkpoint-dir {self.folder} holds checkpoints of an earlier run; "
                                    "pass --resume to continue it, or --force to start over")
        self.force = force

    def found(self) -> list[tuple[int, Path]]:
        """The checkpoints in the folder, as (step, path), oldest first."""
        if not self.folder.is_dir():
            return []
        named = ((_NAME.match(p.name), p) for p in self.folder.iterdir())
        return sorted((int(m.group(1)), p) for m, p in named if m)

    def newest(self) -> dict[str, Any] | None:
        """The newest checkpoint's contents (read with ``weights_only=True``), or None when there is none."""
        found = self.found()
        if not found:
            return None
        step, path = found[-1]
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise InvalidOptionError(f"checkpoint {path} cannot be read ({type(error).__name__}); "
                                     "remove it to resume from the one before") from None

    def due(self, step: int, last: int) -> bool:
        """Whether to save after ``step`` of ``last``."""
        return step == last or (self.every > 0 and step % self.every == 0)

    def start(self, main: bool) -> None:
        """Prepare the folder (the main process only): create it; remove an earlier run's checkpoints when starting over."""
        if not main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.force and not self.resume:
            for _, path in self.found():
                path.unlink(missing_ok=True)

    def save(self, step: int, state: dict[str, Any], main: bool) -> Path | None:
        """Write ``state`` as the checkpoint of ``step`` atomically (the main process only); prune old ones."""
        if not main:
            return None
        path = write_atomic(self.folder / f"step-{step:08d}.pt", lambda tmp: torch.save(state, tmp))
        for _, old in self.found()[: -self.keep]:
            old.unlink(missing_ok=True)
        log.info("checkpoint %s", path)
        return path
