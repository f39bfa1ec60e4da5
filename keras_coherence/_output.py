"""Output folders that are checked before any work and replaced only on success.

A command writes into a fresh hidden folder beside ``--out``
(``.<name>.partial-XXXX``); only when the run succeeds does that folder replace the
old ``--out``. A failure, Ctrl-C or ``kill -9`` therefore never leaves new partial
files mixed with an older run's summary and plots: the old results stay as they were
(a killed run leaves its hidden folder behind, which the next run into the same
``--out`` removes).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile

_PARTIAL = ".{}.partial-"
_REPLACED = ".{}.replaced-"
_TEXT_FILES = ("summary.json",)  # files that record their own paths


class OutputDirError(ValueError):
    """``--out`` cannot be used (a file, or a place that cannot be written)."""


class Staging:
    """Where a run writes (``path``) and where its results end up (``final``)."""

    def __init__(self, path: str, final: str):
        self.path, self.final = path, final

    def public(self, text: str) -> str:
        """``text`` with the staging folder's path replaced by the final one."""
        return text.replace(self.path, self.final)


def _stale(parent, name):
    for pattern in (_PARTIAL, _REPLACED):
        for path in glob.glob(os.path.join(parent or ".", glob.escape(pattern.format(name)) + "*")):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out_dir: str, option: str = "--out"):
    """Yield a :class:`Staging`; write into ``staging.path``. On normal exit its
    contents replace ``out_dir``; on any exception (KeyboardInterrupt included) they
    are deleted and ``out_dir`` is left untouched.

    Raises :class:`OutputDirError` at once -- before any work -- when ``out_dir`` is
    an existing file or its folder cannot be created or written."""
    if not out_dir:
        raise OutputDirError(f"{option} is empty: name a directory.")
    out_dir = os.path.normpath(out_dir)
    parent, name = os.path.split(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputDirError(f"{option} {out_dir} is a file, not a directory: name a new or "
                             "existing directory.")
    ancestor = parent
    while ancestor and not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if ancestor and not os.path.isdir(ancestor):
        raise OutputDirError(f"{option} {out_dir} lies under {ancestor}, which is a file: name a "
                             "directory elsewhere.")
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        _stale(parent, name)
        staging = tempfile.mkdtemp(prefix=_PARTIAL.format(name), dir=parent or ".")
    except OSError as err:
        raise OutputDirError(f"{option} {out_dir} cannot be written ({err.strerror or err}): "
                             "choose a directory you can write to.") from None
    staging = os.path.join(parent, os.path.basename(staging))  # as relative as out_dir
    stage = Staging(staging, out_dir)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for file_name in _TEXT_FILES:
        for path in glob.glob(os.path.join(glob.escape(staging), "**", file_name), recursive=True):
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(stage.public(text))
    if os.path.isdir(out_dir):
        old = tempfile.mkdtemp(prefix=_REPLACED.format(name), dir=parent or ".")
        os.rename(out_dir, os.path.join(old, name))
        os.rename(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out_dir)
