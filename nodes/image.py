"""Image nodes: scaling an input image to the size FLUX.1 Kontext was trained at."""
from __future__ import annotations

from ..pipeline import images as images_lib
from ..pipeline import kontext as kontext_lib
from ._common import CATEGORY, io, ui

IMAGE = CATEGORY + "/image"


class KontextImageScale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxBridgeKontextImageScale",
            display_name="FluxBridge Kontext Image Scale",
            category=IMAGE,
            description="Scales an image to the preferred FLUX.1 Kontext resolution nearest its aspect ratio "
                        "(the list diffusers and ComfyUI share): centred crop to that aspect, then Lanczos, as "
                        "ComfyUI's FluxKontextImageScale does.",
            inputs=[io.Image.Input("image")],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, image):
        image = images_lib.image_batch(image)
        h, w = int(image.shape[1]), int(image.shape[2])
        width, height = kontext_lib.preferred_size(w, h)
        out = images_lib.scale(image, width, height, "lanczos", "center")
        return io.NodeOutput(out, ui=ui([f"{w}x{h} -> {width}x{height}"]))
