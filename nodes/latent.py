"""Latents: empty latent, VAE decode and encode (native LATENT and IMAGE conventions)."""
from __future__ import annotations

from ..runtime import host, models
from ..common.errors import BadInput
from ..pipeline import latents as latents_lib
from ..pipeline import vae as vae_lib
from ..runtime.node_specs import MAX_RESOLUTION
from ._common import CATEGORY, VAE, checked, io, ui

LATENT = CATEGORY + "/latent"
TILED = {"auto": None, "off": False, "on": True}


class EmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeEmptyLatent",
            display_name="FluxBridge Empty Latent",
            category=LATENT,
            description="An empty 16-channel Flux LATENT (like EmptySD3LatentImage). Sizes that are not a "
                        "multiple of 16 are rounded down, with a note.",
            inputs=[
                io.Int.Input("width", default=1024, min=16, max=MAX_RESOLUTION, step=16),
                io.Int.Input("height", default=1024, min=16, max=MAX_RESOLUTION, step=16),
                io.Int.Input("batch_size", default=1, min=1, max=64),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, width=1024, height=1024, batch_size=1):
        width, height, batch_size = checked(cls, width=width, height=height, batch_size=batch_size)
        notes = []
        latent = latents_lib.empty_latent(int(width), int(height), int(batch_size), notes=notes)
        latent["samples"] = latent["samples"].to(host.intermediate_device())
        return io.NodeOutput(latent, ui=ui(notes))


def _samples(latent, what="latent"):
    if not isinstance(latent, dict) or "samples" not in latent:
        raise BadInput(what, "expected a LATENT (a dict with 'samples')")
    return latent["samples"]


class VAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeVAEDecode",
            display_name="FluxBridge VAE Decode",
            category=LATENT,
            description="LATENT → IMAGE. auto: whole image, in tiles if it runs out of memory.",
            inputs=[VAE.Input("vae"), io.Latent.Input("latent"),
                    io.Combo.Input("tiled", options=list(TILED), default="auto")],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, vae, latent, tiled="auto"):
        if tiled not in TILED:
            raise BadInput("tiled", f"{tiled!r}: expected one of {', '.join(TILED)}")
        samples = _samples(latent)
        models.check_vae_latent(vae, samples)
        notes = []
        tile = samples[..., :vae_lib.TILE, :vae_lib.TILE] if TILED[tiled] else samples  # one tile at a time
        host.load_to_device([vae.handle], memory_required=vae_lib.decode_memory(vae.module, tile.shape))
        image = vae_lib.decode(vae.module, samples, tiled=TILED[tiled], notes=notes)
        return io.NodeOutput(image, ui=ui(notes))


class VAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeVAEEncode",
            display_name="FluxBridge VAE Encode",
            category=LATENT,
            description="IMAGE → LATENT (posterior mean, as ComfyUI's VAEEncode).",
            inputs=[VAE.Input("vae"), io.Image.Input("image")],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, vae, image):
        notes = []
        host.load_to_device([vae.handle], memory_required=vae_lib.encode_memory(vae.module, image.shape))
        samples = vae_lib.encode(vae.module, image, notes=notes)
        return io.NodeOutput({"samples": samples.to(host.intermediate_device())}, ui=ui(notes))
