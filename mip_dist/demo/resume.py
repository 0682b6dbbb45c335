"""The demo never overwrites a run and continues one that was cut off."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from mip_dist.engine.checkpoint import resolve_resume
from mip_dist.engine.run_dir import FINISHED

log = logging.getLogger(__name__)


def unfinished_demo_run(output_dir: str) -> Optional[str]:
    """The newest checkpoint under `output_dir` when its run has no FINISHED marker (the demo resumes it),
    else None (the demo starts a new run directory)."""
    tag = resolve_resume("auto", None, Path(output_dir))
    if tag is None or (tag.parent.parent / FINISHED).exists():
        return None
    log.info("resuming the unfinished demo run %s (from %s)", tag.parent.parent, tag.name)
    return str(tag)
