"""FLUX.1 Kontext: reference images that the transformer reads as extra image tokens.

Native form (ComfyUI's ReferenceLatent node, `comfy/model_base.py` Flux): the CONDITIONING dict holds
`reference_latents`, a list of *raw* VAE latents `[B, C, h, w]`, appended to by each reference node, and
optionally `reference_latents_method` ("offset", the default; "index"; "uxo").

Sampling (diffusers FluxKontextPipeline): each reference is normalised like the latent and packed into 2x2
patches; the tokens are appended after the noisy latent's tokens at every step (`cat([x, refs], dim=1)`),
with position ids (index, row, col) whose first axis is 1 instead of 0; the model's output is cut back to
the latent's tokens. The schedule's image length counts the latent only.

Several references ("offset", what ComfyUI does and what the released Kontext model works with): all get
index 1 and are laid out on one canvas as if stitched together, each placed right of or below what is
there so far (whichever keeps the canvas closer to square). Two references of the same width thus get the
ids of one reference twice as tall, which is how diffusers' FluxKontextPipeline (one image) sees their
stitched latents. "index" gives the k-th reference index k with no offset; "uxo" offsets each one past
the latent and the references before it, all at index 0.
"""
from __future__ import annotations

import torch

from ..common.errors import BadInput
from ._notes import note
from .fill import _batch
from .latents import LatentFormat, image_ids, pack

REFERENCE_KEY = "reference_latents"
METHOD_KEY = "reference_latents_method"
METHODS = ("offset", "index", "uxo")

# (width, height) the Kontext model was trained at; the same list in diffusers (PREFERRED_KONTEXT_RESOLUTIONS)
# and ComfyUI (FluxKontextImageScale).
PREFERRED_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720),
    (1504, 688), (1568, 672),
)


def preferred_size(width: int, height: int) -> tuple[int, int]:
    """The preferred (width, height) whose aspect ratio is nearest the image's (ties: the smaller width),
    chosen as diffusers and ComfyUI choose it."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_RESOLUTIONS)
    return w, h


def add_reference(conditioning, latent: torch.Tensor) -> list:
    """A copy of a CONDITIONING with one more raw latent in every entry's `reference_latents` (the native
    ReferenceLatent node's append)."""
    out = []
    for cond, extra in conditioning:
        extra = dict(extra)
        extra[REFERENCE_KEY] = list(extra.get(REFERENCE_KEY) or []) + [latent]
        out.append([cond, extra])
    return out


def check_references(refs, channels: int, which: str, model: str) -> list[torch.Tensor]:
    """The references of a conditioning dict as a list of [B, C, h, w] tensors with the model's latent
    channel count; a problem is a BadInput naming the reference and `model`."""
    if not isinstance(refs, (list, tuple)):
        raise BadInput(which, f"{REFERENCE_KEY} must be a list of latents, got {type(refs).__name__}")
    for k, ref in enumerate(refs, 1):
        if not torch.is_tensor(ref) or ref.ndim != 4:
            raise BadInput(which, f"Kontext reference {k} is not a latent [B, C, h, w] "
                                  f"(got {list(getattr(ref, 'shape', [])) or type(ref).__name__})")
        if ref.shape[1] != channels:
            raise BadInput(which, f"Kontext reference {k} has {ref.shape[1]} latent channels, {model} works on "
                                  f"{channels}-channel latents (encode the reference with the Flux VAE)")
    return list(refs)


def _placements(refs, method: str, grid: tuple[int, int]):
    """(index, row offset, column offset) of each reference, in latent pixels, as ComfyUI lays them out.
    `grid` is the noisy latent's token grid (rows, cols)."""
    h = w = index = 0
    out = []
    for ref in refs:
        rh, rw = ref.shape[-2:]
        if method == "index":
            index, ho, wo = index + 1, 0, 0
        elif method == "uxo":
            index, ho, wo = 0, grid[0] * 2 + h, grid[1] * 2 + w
            h, w = h + rh, w + rw
        else:  # offset: stitched onto one canvas, right of or below what is there
            index, ho, wo = 1, 0, 0
            if rh + h > rw + w:
                wo = w
            else:
                ho = h
            h, w = max(h, rh + ho), max(w, rw + wo)
        out.append((index, ho, wo))
    return out


def reference_tokens(refs, method: str, batch: int, grid: tuple[int, int], fmt: LatentFormat | None = None,
                     device=None, dtype=torch.float32, notes: list | None = None):
    """(tokens [batch, L, 4C], ids [L, 3]) of raw reference latents: normalised, padded to even sizes
    (circularly, as ComfyUI pads), packed, and placed by `method`."""
    if method not in METHODS:
        raise BadInput(METHOD_KEY, f"{method!r}: expected one of {', '.join(METHODS)}")
    fmt = fmt or LatentFormat()
    tokens, ids = [], []
    for k, (ref, (index, ho, wo)) in enumerate(zip(refs, _placements(refs, method, grid)), 1):
        z = fmt.process_in(_batch(ref.detach().float().cpu(), batch, f"Kontext reference {k}"))
        ph, pw = z.shape[-2] % 2, z.shape[-1] % 2
        if ph or pw:
            note(f"Kontext reference {k}: {z.shape[-1]}x{z.shape[-2]} latent pixels padded to even sizes", notes)
            z = torch.nn.functional.pad(z, (0, pw, 0, ph), mode="circular")
        tokens.append(pack(z))
        ids.append(image_ids(z.shape[-2] // 2, z.shape[-1] // 2, index, row_offset=(ho + 1) // 2,
                             col_offset=(wo + 1) // 2))
    return (torch.cat(tokens, dim=1).to(device=device, dtype=dtype),
            torch.cat(ids).to(device=device))
