"""What the node-graph tests share: running one node as ComfyUI (or the runner) would, and a models folder's
tokenizers."""
import shutil
from pathlib import Path


def run(cls, **inputs):
    """Execute one node; returns (outputs tuple, ui dict)."""
    out = cls.execute(**inputs)
    return out.args, (out.ui or {})


def copy_tokenizers(source: Path, models: Path) -> None:
    """The CLIP-L and T5 tokenizer files (`clip-l/`, `t5-xxl/` under `source`) into a models folder's
    `tokenizers/clip_l/` and `tokenizers/t5xxl/`."""
    shutil.copytree(source / "clip-l", models / "tokenizers" / "clip_l")
    shutil.copytree(source / "t5-xxl", models / "tokenizers" / "t5xxl")
