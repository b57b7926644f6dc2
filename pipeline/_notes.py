"""Notes for the user: things we changed or worked around (never silently). Logged, and appended to the
caller's list when one is given, so a node can show them."""
from __future__ import annotations

import logging

logger = logging.getLogger("fluxbridge.pipeline")


def note(message: str, notes: list | None = None) -> str:
    logger.warning(message)
    if notes is not None:
        notes.append(message)
    return message
