"""A subprocess's environment in which `import fluxbridge` (and `python -m fluxbridge`) is this checkout."""
import os
from pathlib import Path


def checkout_env(folder: Path, **extra) -> dict:
    """This environment plus `extra`, with `folder` first on PYTHONPATH and `folder/fluxbridge` a link to the
    checkout (made if missing)."""
    import fluxbridge
    link = Path(folder) / "fluxbridge"
    if not link.exists():
        link.symlink_to(Path(fluxbridge.__file__).resolve().parent, target_is_directory=True)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)
