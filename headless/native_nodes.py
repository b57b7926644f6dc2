"""Headless stand-ins for the native ComfyUI nodes our example workflows use.

Inside ComfyUI these types are ComfyUI's own; the headless runner needs them too. Each one is declared
with the same id, input names, types, ranges and outputs as in ComfyUI (0.3.64), so a workflow checked
here loads there, and implemented in the native data conventions (IMAGE `[B,H,W,3]` float 0..1, MASK
`[B,H,W]`, LATENT `{"samples": [B,16,H/8,W/8]}`).

Only these types are allowed in workflows besides ours: `NATIVE_NODES` is the allow-list.
The nodes of ComfyUI's own model graph (UNETLoader, DualCLIPLoader, CLIPTextEncode(Flux), FluxGuidance,
ConditioningZeroOut, KSampler, VAELoader, VAEDecode) are declared only (`needs_comfy`), so that workflows for
native models are checked too: the runner refuses to run them ("needs ComfyUI"), it has no ComfyUI sampler.
Files: `LoadImage` reads only names inside the input folder; `SaveImage` and `PreviewImage` write only
inside the output folder (previews in its `temp/` subfolder), never elsewhere. "Inside" is by the name's
spelling (`host.check_name`): links the user made in these folders are the user's and are followed.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import host
from ..common.errors import BadInput
from ..runtime.node_specs import MAX_RESOLUTION, InputSpec, NodeSpec, output_prefix_problem

# LoadImage decodes at most this many pixels (all frames together) and frames up to MAX_RESOLUTION a side:
# an image file is refused before decoding when its header says more (a decompression bomb).
MAX_IMAGE_PIXELS = 1 << 27
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
MASK_OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]
TEMP_SUBFOLDER = "temp"
_RNG = random.Random()  # preview names only; leaves the global random state alone


@dataclass
class RunContext:
    """What native nodes need from the run: folders, the prompt (for PNG metadata), the node id."""
    output_dir: Path
    input_dir: Path | None = None
    prompt: dict | None = None
    workflow: dict | None = None  # the UI workflow, when known, embedded in saved PNGs like ComfyUI does
    node_id: str = ""
    written: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------ file names

def inside(root: Path, path: Path) -> bool:
    """`path` is `root` or below it by its spelling (links in `root` are not resolved: they are the user's)."""
    root, path = os.path.abspath(root), os.path.abspath(path)
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives
        return False


def list_input_images(input_dir) -> list[str]:
    """Image files in the input folder (relative, '/'-separated, sorted), for LoadImage's combo; linked
    files and sub-folders included (`host.walk`)."""
    if input_dir is None or not Path(input_dir).is_dir():
        return []
    root = Path(input_dir)
    found = []
    for dirpath, _, filenames in host.walk(str(root)):
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


# ------------------------------------------------------------------------------------------------ nodes

def _images_to_png(ctx: RunContext, images, prefix: str, kind: str):
    """Write each image of the batch as `<prefix>_<counter:05>_.png` inside the output folder (numbered as
    ComfyUI does, past the files already there), with the prompt and the UI workflow as PNG text."""
    import numpy as np
    import torch
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    why = output_prefix_problem(prefix)
    if why:
        raise BadInput(prefix, f"filename_prefix: {why}")
    results = []
    for image in images:
        array = (image.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
        pil = Image.fromarray(np.ascontiguousarray(array.numpy()))
        meta = PngInfo()
        if ctx.prompt is not None:
            meta.add_text("prompt", json.dumps(ctx.prompt))
        if ctx.workflow is not None:
            meta.add_text("workflow", json.dumps(ctx.workflow))
        target = Path(host.safe_output_path(prefix, ".png"))
        if not inside(ctx.output_dir, target):  # the host's output folder must be the run's
            raise BadInput(prefix, f"{target} is outside the output folder {ctx.output_dir}")
        partial = target.with_name(target.name + ".partial")  # renamed into place only when complete
        try:
            pil.save(partial, format="PNG", pnginfo=meta, compress_level=4)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        ctx.written.append(str(target))
        subfolder = Path(os.path.relpath(target.parent, host.output_directory())).as_posix()
        subfolder = "" if subfolder == "." else subfolder
        if kind == "temp":  # ComfyUI's temp folder is its own root; ours is output/temp
            subfolder = subfolder[len(TEMP_SUBFOLDER):].lstrip("/")
        results.append({"filename": target.name, "subfolder": subfolder, "type": kind})
    return results


def save_image(ctx: RunContext, images, filename_prefix="ComfyUI"):
    return (), {"images": _images_to_png(ctx, images, filename_prefix, "output")}


def preview_image(ctx: RunContext, images):
    stem = "ComfyUI_temp_" + "".join(_RNG.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    return (), {"images": _images_to_png(ctx, images, f"{TEMP_SUBFOLDER}/{stem}", "temp")}


def load_image(ctx: RunContext, image):
    from PIL import Image

    if ctx.input_dir is None:
        raise BadInput(image, "no input folder to load images from")
    try:
        host.check_name(image, "input")  # absolute, '..', NUL, unencodable
    except BadInput as exc:
        raise BadInput(exc.path, f"image names must stay inside the input folder ({exc.cause})") from None
    path = Path(ctx.input_dir) / image
    if not path.is_file():
        raise BadInput(path, "no such image in the input folder")
    try:
        pil = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInput(path, f"cannot read the image: {exc}") from None
    try:
        return _decode_frames(path, pil)
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInput(path, f"cannot read the image: {exc}") from None  # truncated or corrupt data
    finally:
        pil.close()


def _decode_frames(path, pil):
    import numpy as np
    import torch
    from PIL import ImageOps, ImageSequence

    images, masks, size, pixels = [], [], None, 0
    for frame in ImageSequence.Iterator(pil):
        w, h = frame.size
        pixels += w * h
        if w > MAX_RESOLUTION or h > MAX_RESOLUTION or pixels > MAX_IMAGE_PIXELS:
            raise BadInput(path, f"the image is too large: {w}x{h} pixels per frame (the limits are "
                                 f"{MAX_RESOLUTION} a side and {MAX_IMAGE_PIXELS} pixels in all frames)")
        frame = ImageOps.exif_transpose(frame)
        if frame.mode == "I":
            frame = frame.point(lambda v: v * (1 / 255))
        rgb = frame.convert("RGB")
        if size is None:
            size = rgb.size
        if rgb.size != size:
            continue
        images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0))
        if "A" in frame.getbands():
            alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
            masks.append(1.0 - torch.from_numpy(alpha))
        elif frame.mode == "P" and "transparency" in frame.info:
            alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
            masks.append(1.0 - torch.from_numpy(alpha))
        else:
            masks.append(torch.zeros((64, 64), dtype=torch.float32))
    if len({tuple(m.shape) for m in masks}) > 1:  # mixed frames: keep ComfyUI's shape of the first
        masks = [m if m.shape == masks[0].shape else torch.zeros_like(masks[0]) for m in masks]
    return (torch.stack(images), torch.stack(masks)), {}


def empty_sd3_latent(ctx: RunContext, width=1024, height=1024, batch_size=1):
    import torch
    samples = torch.zeros([batch_size, 16, height // 8, width // 8])
    return ({"samples": samples},), {}


def image_scale_by(ctx: RunContext, image, upscale_method="nearest-exact", scale_by=1.0):
    """ImageScaleBy: `comfy.utils.common_upscale` without a crop, unclamped as there (bicubic can overshoot
    0..1; lanczos goes through 8-bit images)."""
    from ..pipeline.images import scale

    width = round(image.shape[2] * scale_by)
    height = round(image.shape[1] * scale_by)
    width, height = max(width, 1), max(height, 1)
    if width > MAX_RESOLUTION or height > MAX_RESOLUTION:  # chained upscales grow without bound otherwise
        raise BadInput("scale_by", f"{image.shape[2]}x{image.shape[1]} scaled by {scale_by} is {width}x{height}, "
                                   f"over {MAX_RESOLUTION} pixels a side")
    return (scale(image, width, height, upscale_method),), {}


def reference_latent(ctx: RunContext, conditioning, latent=None):
    """ReferenceLatent (comfy_extras/nodes_edit_model.py): appends the latent to `reference_latents`."""
    from ..pipeline.kontext import add_reference

    return (conditioning if latent is None else add_reference(conditioning, latent["samples"]),), {}


def canny(ctx: RunContext, image, low_threshold=0.4, high_threshold=0.8):
    """Canny (comfy_extras/nodes_canny.py, kornia's `canny` with its defaults): grey (ITU-R 601), a 5x5
    Gaussian blur (sigma 1, reflected border), unnormalised Sobel gradients (replicated border), non-maximum
    suppression along the gradient rounded to 45 degrees (ties kept on the left / upper side), thresholds
    on the magnitude, then hysteresis through the 8 neighbours. Returns the edges as a grey IMAGE."""
    import torch
    import torch.nn.functional as F

    if low_threshold > high_threshold:
        raise BadInput("low_threshold", f"{low_threshold} is above high_threshold {high_threshold}")
    r, g, b = image[..., :3].movedim(-1, 1).float().unbind(1)
    blurred = torch.addcmul(torch.addcmul(r * 0.299, g, torch.tensor(0.587)), b, torch.tensor(0.114))[:, None]
    kernel = torch.exp(-(torch.arange(5.0) - 2) ** 2 / 2)
    kernel = kernel / kernel.sum()
    for axis in (-1, -2):  # separable, tap by tap, in kornia's order (rows, then columns)
        size = blurred.shape[axis]
        padded = F.pad(blurred, (2, 2, 0, 0) if axis == -1 else (0, 0, 2, 2), mode="reflect")
        blurred = padded.narrow(axis, 0, size) * kernel[0]
        for tap in range(1, 5):
            blurred = blurred.addcmul(padded.narrow(axis, tap, size), kernel[tap])
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(blurred, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel[None, None])
    gy = F.conv2d(padded, sobel.t()[None, None])
    mag = torch.sqrt(F.pad(gx, (1, 1, 1, 1)) ** 2 + F.pad(gy, (1, 1, 1, 1)) ** 2 + 1e-6)
    h, w = gx.shape[-2:]
    offsets = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
    window = torch.stack([mag[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in offsets], 2)
    centre = mag[..., 1:1 + h, 1:1 + w]
    octant = (torch.nan_to_num(torch.atan2(gy, gx)) * (4 / torch.pi)).round()
    keep = torch.ones_like(centre, dtype=torch.bool)
    for idx in (octant % 8, (octant + 4) % 8):
        idx = idx.long()
        other = torch.gather(window, 2, idx[:, :, None]).squeeze(2)
        keep &= (centre > other) | (((idx == 0) | (idx == 2)) & (centre == other))
    centre = centre * (keep & (centre > mag[..., :1, :1]))
    edges = (centre > low_threshold).float() * 0.5 + (centre > high_threshold).float() * 0.5
    links = torch.zeros(8, 1, 3, 3)
    for k, (dy, dx) in enumerate(offsets):
        links[k, 0, 1 + dy, 1 + dx] = 1.0
    while True:  # weak edges touching a strong one become strong, until nothing changes
        weak, strong = (edges == 0.5).float(), (edges == 1).float()
        grown = (F.conv2d(edges, links, padding=1) == 1).any(1, keepdim=True).float() * weak + strong
        grown = grown + (grown == 0) * weak * 0.5
        if torch.equal(grown, edges):
            break
        edges = grown
    return ((edges == 1).float().repeat(1, 3, 1, 1).movedim(1, -1).contiguous(),), {}


def solid_mask(ctx: RunContext, value=1.0, width=512, height=512):
    import torch
    return (torch.full((1, height, width), float(value), dtype=torch.float32),), {}


def mask_composite(ctx: RunContext, destination, source, x=0, y=0, operation="multiply"):
    """`source` combined into `destination` with its top-left corner at (x, y), clamped to 0..1; the part
    of `source` that falls outside `destination` is left out."""
    import torch

    out = destination.reshape(-1, *destination.shape[-2:]).clone()
    source = source.reshape(-1, *source.shape[-2:]).to(out.device)
    bottom, right = min(y + source.shape[-2], out.shape[-2]), min(x + source.shape[-1], out.shape[-1])
    if bottom > y and right > x:
        dst, src = out[:, y:bottom, x:right], source[:, :bottom - y, :right - x]
        if operation in ("and", "or", "xor"):
            logic = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
            combined = logic(dst.round().bool(), src.round().bool()).float()
        else:
            combined = {"multiply": torch.mul, "add": torch.add, "subtract": torch.sub}[operation](dst, src)
        out[:, y:bottom, x:right] = combined
    return (out.clamp(0.0, 1.0),), {}


def native_specs(input_dir=None) -> dict[str, NodeSpec]:
    """The allow-list of native node types: their ComfyUI signatures and headless implementations.
    `input_dir` fills LoadImage's choices (the images in the input folder)."""
    images = list_input_images(input_dir)
    specs = [
        NodeSpec("SaveImage", [InputSpec("images", "IMAGE"),
                               InputSpec("filename_prefix", "STRING", default="ComfyUI")],
                 [], output_node=True, display_name="Save Image", native=True, run=save_image),
        NodeSpec("PreviewImage", [InputSpec("images", "IMAGE")], [], output_node=True,
                 display_name="Preview Image", native=True, run=preview_image),
        NodeSpec("LoadImage", [InputSpec("image", "COMBO", options=images, upload=True)],
                 [("IMAGE", "IMAGE"), ("MASK", "MASK")], display_name="Load Image", native=True,
                 run=load_image),
        NodeSpec("EmptySD3LatentImage",
                 [InputSpec("width", "INT", default=1024, min=16, max=MAX_RESOLUTION, step=16),
                  InputSpec("height", "INT", default=1024, min=16, max=MAX_RESOLUTION, step=16),
                  InputSpec("batch_size", "INT", default=1, min=1, max=4096)],
                 [("LATENT", "LATENT")], display_name="EmptySD3LatentImage", native=True, run=empty_sd3_latent),
        NodeSpec("ReferenceLatent", [InputSpec("conditioning", "CONDITIONING"),
                                     InputSpec("latent", "LATENT", optional=True)],
                 [("CONDITIONING", "CONDITIONING")], display_name="ReferenceLatent", native=True,
                 run=reference_latent),
        NodeSpec("Canny", [InputSpec("image", "IMAGE"),
                           InputSpec("low_threshold", "FLOAT", default=0.4, min=0.01, max=0.99, step=0.01),
                           InputSpec("high_threshold", "FLOAT", default=0.8, min=0.01, max=0.99, step=0.01)],
                 [("IMAGE", "IMAGE")], display_name="Canny", native=True, run=canny),
        NodeSpec("ImageScaleBy",
                 [InputSpec("image", "IMAGE"),
                  InputSpec("upscale_method", "COMBO", options=list(UPSCALE_METHODS)),
                  InputSpec("scale_by", "FLOAT", default=1.0, min=0.01, max=8.0, step=0.01)],
                 [("IMAGE", "IMAGE")], display_name="Upscale Image By", native=True, run=image_scale_by),
        NodeSpec("SolidMask",
                 [InputSpec("value", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
                  InputSpec("width", "INT", default=512, min=1, max=MAX_RESOLUTION, step=1),
                  InputSpec("height", "INT", default=512, min=1, max=MAX_RESOLUTION, step=1)],
                 [("MASK", "MASK")], display_name="SolidMask", native=True, run=solid_mask),
        NodeSpec("MaskComposite",
                 [InputSpec("destination", "MASK"), InputSpec("source", "MASK"),
                  InputSpec("x", "INT", default=0, min=0, max=MAX_RESOLUTION, step=1),
                  InputSpec("y", "INT", default=0, min=0, max=MAX_RESOLUTION, step=1),
                  InputSpec("operation", "COMBO", options=list(MASK_OPERATIONS))],
                 [("MASK", "MASK")], display_name="MaskComposite", native=True, run=mask_composite),
    ]
    return {s.node_id: s for s in specs + comfy_only_specs()}


# ComfyUI 0.3.64's comfy.samplers.KSampler.SAMPLERS and .SCHEDULERS
SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
            "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
            "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
            "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
            "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
            "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal"]
CLIP_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]  # DualCLIPLoader's `type`


def comfy_only_specs() -> list[NodeSpec]:
    """ComfyUI's native model nodes, with 0.3.64's input names, types, ranges and outputs (the file lists
    are the models folder's, as the host lists them). Checked, never run headless."""
    def spec(node_id, inputs, outputs, display_name):
        return NodeSpec(node_id, inputs, outputs, display_name=display_name, native=True, needs_comfy=True)

    text = lambda name: InputSpec(name, "STRING", multiline=True)  # noqa: E731
    guidance = InputSpec("guidance", "FLOAT", default=3.5, min=0.0, max=100.0, step=0.1)
    return [
        spec("UNETLoader", [InputSpec("unet_name", "COMBO", options=host.model_choices("diffusion_models")),
                            InputSpec("weight_dtype", "COMBO",
                                      options=["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])],
             [("MODEL", "MODEL")], "Load Diffusion Model"),
        spec("DualCLIPLoader", [InputSpec("clip_name1", "COMBO", options=host.model_choices("text_encoders")),
                                InputSpec("clip_name2", "COMBO", options=host.model_choices("text_encoders")),
                                InputSpec("type", "COMBO", options=list(CLIP_TYPES)),
                                InputSpec("device", "COMBO", optional=True, options=["default", "cpu"])],
             [("CLIP", "CLIP")], "DualCLIPLoader"),
        spec("CLIPTextEncode", [text("text"), InputSpec("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")],
             "CLIP Text Encode (Prompt)"),
        spec("CLIPTextEncodeFlux", [InputSpec("clip", "CLIP"), text("clip_l"), text("t5xxl"), guidance],
             [("CONDITIONING", "CONDITIONING")], "CLIPTextEncodeFlux"),
        spec("FluxGuidance", [InputSpec("conditioning", "CONDITIONING"), guidance],
             [("CONDITIONING", "CONDITIONING")], "FluxGuidance"),
        spec("ConditioningZeroOut", [InputSpec("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")],
             "ConditioningZeroOut"),
        spec("KSampler", [InputSpec("model", "MODEL"),
                          InputSpec("seed", "INT", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control=True),
                          InputSpec("steps", "INT", default=20, min=1, max=10000),
                          InputSpec("cfg", "FLOAT", default=8.0, min=0.0, max=100.0, step=0.1),
                          InputSpec("sampler_name", "COMBO", options=list(SAMPLERS)),
                          InputSpec("scheduler", "COMBO", options=list(SCHEDULERS)),
                          InputSpec("positive", "CONDITIONING"), InputSpec("negative", "CONDITIONING"),
                          InputSpec("latent_image", "LATENT"),
                          InputSpec("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01)],
             [("LATENT", "LATENT")], "KSampler"),
        spec("VAELoader", [InputSpec("vae_name", "COMBO", options=host.model_choices("vae") + ["pixel_space"])],
             [("VAE", "VAE")], "Load VAE"),
        spec("VAEDecode", [InputSpec("samples", "LATENT"), InputSpec("vae", "VAE")], [("IMAGE", "IMAGE")],
             "VAE Decode"),
    ]


NATIVE_NODES = tuple(native_specs())
