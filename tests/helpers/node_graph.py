"""What the node-graph tests share: running one node as ComfyUI (or the runner) would, and a models folder's
tokenizers."""
import shutil
from pathlib import Path


def run(cls, **inputs):
    """Execute one node; returns (outputs tuple, ui dict)."""
    out = cls.execute(**inputs)
    return out.args, (out.ui or {})


def copy_tokenizers(source: Path, models: Path) -> None:
    """The CLIP-L and T5 tokenizer files (`clip_l/`, `t5xxl/` under `source`, e.g. the pack's own
    `tokenizers/`) into a models folder's `tokenizers/clip_l/` and `tokenizers/t5xxl/`."""
    for name in ("clip_l", "t5xxl"):
        shutil.copytree(source / name, models / "tokenizers" / name)
