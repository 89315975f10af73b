"""An output folder written whole or not at all.

Every command that writes a folder (a student, an export, generated images, an
evaluation) writes it beside its destination under a temporary name and renames
it into place. A folder being replaced is set aside first and deleted only once
the new one stands, so a crash at any point leaves either the old folder or the
new one, never neither and never half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def written_whole(out: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``out``; on a clean exit it becomes ``out`` (replacing
    what was there), on an exception it is removed and ``out`` is untouched. Callers check beforehand
    whether replacing ``out`` is allowed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
