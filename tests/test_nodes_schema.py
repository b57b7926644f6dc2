"""The node catalogue (docs/NODES.md) as the schemas declare it: ids, categories, inputs, outputs; the
entry point registers every node; the combos list the model folders; no ComfyUI import outside host."""
import asyncio
import inspect
from pathlib import Path

import pytest

from fluxbridge.nodes import NODE_LIST

ROOT = Path(__file__).resolve().parents[1]

# id -> (category, [(input, type, optional)], [(output name, type)], output node)
CATALOGUE = {
    "FluxBridgeLoadTransformer": ("loaders", [("model_name", "COMBO", False), ("weight_dtype", "COMBO", False),
                                              ("quantize", "COMBO", False), ("variant", "COMBO", True)],
                                  [("transformer", "FLUXBRIDGE_TRANSFORMER")], False),
    "FluxBridgeLoadTextEncoders": ("loaders", [("clip_name", "COMBO", False), ("t5_name", "COMBO", False),
                                               ("weight_dtype", "COMBO", False)],
                                   [("text_encoders", "FLUXBRIDGE_TEXT_ENCODERS")], False),
    "FluxBridgeLoadVAE": ("loaders", [("vae_name", "COMBO", False)], [("vae", "FLUXBRIDGE_VAE")], False),
    "FluxBridgeLoadLoRA": ("loaders", [("transformer", "FLUXBRIDGE_TRANSFORMER", False), ("lora_name", "COMBO", False),
                                       ("strength_model", "FLOAT", False), ("strength_text", "FLOAT", False),
                                       ("text_encoders", "FLUXBRIDGE_TEXT_ENCODERS", True)],
                           [("transformer", "FLUXBRIDGE_TRANSFORMER"), ("text_encoders", "FLUXBRIDGE_TEXT_ENCODERS")],
                           False),
    "FluxBridgeLoadRedux": ("loaders", [("redux_name", "COMBO", False), ("clip_vision_name", "COMBO", False)],
                            [("redux", "FLUXBRIDGE_REDUX")], False),
    "FluxBridgeTextEncode": ("conditioning", [("text_encoders", "FLUXBRIDGE_TEXT_ENCODERS", False),
                                              ("clip_text", "STRING", False), ("t5_text", "STRING", False),
                                              ("guidance", "FLOAT", False), ("max_sequence_length", "INT", False)],
                             [("conditioning", "CONDITIONING")], False),
    "FluxBridgeEmptyLatent": ("latent", [("width", "INT", False), ("height", "INT", False),
                                         ("batch_size", "INT", False)], [("latent", "LATENT")], False),
    "FluxBridgeScheduler": ("sampling", [("steps", "INT", False), ("width", "INT", False), ("height", "INT", False),
                                         ("denoise", "FLOAT", False), ("shift", "COMBO", False),
                                         ("transformer", "FLUXBRIDGE_TRANSFORMER", True)],
                            [("sigmas", "SIGMAS")], False),
    "FluxBridgeAddNoise": ("sampling", [("latent", "LATENT", False), ("sigmas", "SIGMAS", False),
                                        ("seed", "INT", False)], [("latent", "LATENT")], False),
    "FluxBridgeSchedulerStep": ("sampling", [("transformer", "FLUXBRIDGE_TRANSFORMER", False),
                                             ("positive", "CONDITIONING", False), ("latent", "LATENT", False),
                                             ("sigmas", "SIGMAS", False), ("step", "INT", False),
                                             ("negative", "CONDITIONING", True), ("true_cfg", "FLOAT", False)],
                                [("latent", "LATENT")], False),
    "FluxBridgeSampler": ("sampling", [("transformer", "FLUXBRIDGE_TRANSFORMER", False),
                                       ("positive", "CONDITIONING", False), ("latent", "LATENT", False),
                                       ("seed", "INT", False), ("steps", "INT", False), ("denoise", "FLOAT", False),
                                       ("true_cfg", "FLOAT", False), ("negative", "CONDITIONING", True),
                                       ("sigmas", "SIGMAS", True)], [("latent", "LATENT")], False),
    "FluxBridgeVAEDecode": ("latent", [("vae", "FLUXBRIDGE_VAE", False), ("latent", "LATENT", False),
                                       ("tiled", "COMBO", False)], [("image", "IMAGE")], False),
    "FluxBridgeVAEEncode": ("latent", [("vae", "FLUXBRIDGE_VAE", False), ("image", "IMAGE", False)],
                            [("latent", "LATENT")], False),
    "FluxBridgeFillConditioning": ("conditioning", [("vae", "FLUXBRIDGE_VAE", False),
                                                    ("positive", "CONDITIONING", False), ("image", "IMAGE", False),
                                                    ("mask", "MASK", False), ("negative", "CONDITIONING", True)],
                                   [("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                    ("latent", "LATENT")], False),
    "FluxBridgeControlConditioning": ("conditioning", [("vae", "FLUXBRIDGE_VAE", False),
                                                       ("positive", "CONDITIONING", False),
                                                       ("control_image", "IMAGE", False),
                                                       ("negative", "CONDITIONING", True)],
                                      [("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                       ("latent", "LATENT")], False),
    "FluxBridgeKontextReference": ("conditioning", [("vae", "FLUXBRIDGE_VAE", False),
                                                    ("conditioning", "CONDITIONING", False), ("image", "IMAGE", False)],
                                   [("conditioning", "CONDITIONING"), ("latent", "LATENT")], False),
    "FluxBridgeKontextImageScale": ("image", [("image", "IMAGE", False)], [("image", "IMAGE")], False),
    "FluxBridgeReduxConditioning": ("conditioning", [("conditioning", "CONDITIONING", False),
                                                     ("redux", "FLUXBRIDGE_REDUX", False), ("image", "IMAGE", False),
                                                     ("strength", "FLOAT", False), ("crop", "COMBO", False)],
                                    [("conditioning", "CONDITIONING")], False),
    "FluxBridgeSaveTransformer": ("convert", [("transformer", "FLUXBRIDGE_TRANSFORMER", False),
                                              ("layout", "COMBO", False), ("dtype", "COMBO", False),
                                              ("filename_prefix", "STRING", False)], [], True),
    "FluxBridgeSaveVAE": ("convert", [("vae", "FLUXBRIDGE_VAE", False), ("layout", "COMBO", False),
                                      ("filename_prefix", "STRING", False)], [], True),
    "FluxBridgeConvertLoRA": ("convert", [("lora_name", "COMBO", False), ("to", "COMBO", False),
                                          ("filename_prefix", "STRING", False)], [], True),
    "FluxBridgeLoadNativeModel": ("native", [("model_name", "COMBO", False), ("weight_dtype", "COMBO", False)],
                                  [("MODEL", "MODEL")], False),
    "FluxBridgeNativeLoRA": ("native", [("model", "MODEL", False), ("lora_name", "COMBO", False),
                                        ("strength_model", "FLOAT", False), ("strength_clip", "FLOAT", False),
                                        ("clip", "CLIP", True)], [("MODEL", "MODEL"), ("CLIP", "CLIP")], False),
}

WIDGETS = {  # (node, input) -> expected attributes
    ("FluxBridgeLoadTransformer", "weight_dtype"): dict(
        options=["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"], default="default"),
    ("FluxBridgeLoadTransformer", "quantize"): dict(options=["none", "int8", "fp8", "quanto-int8", "quanto-fp8"],
                                                  default="none"),
    ("FluxBridgeLoadTransformer", "variant"): dict(options=["auto", "kontext"], default="auto"),
    ("FluxBridgeReduxConditioning", "strength"): dict(min=0.0, max=10.0, default=1.0),
    ("FluxBridgeReduxConditioning", "crop"): dict(options=["center", "none"], default="center"),
    ("FluxBridgeLoadTextEncoders", "weight_dtype"): dict(options=["default", "bf16", "fp16", "fp32"],
                                                         default="default"),
    ("FluxBridgeLoadLoRA", "strength_model"): dict(min=-10.0, max=10.0, default=1.0),
    ("FluxBridgeLoadLoRA", "strength_text"): dict(min=-10.0, max=10.0, default=1.0),
    ("FluxBridgeTextEncode", "clip_text"): dict(multiline=True),
    ("FluxBridgeTextEncode", "t5_text"): dict(multiline=True),
    ("FluxBridgeTextEncode", "guidance"): dict(min=0.0, max=100.0, default=3.5),
    ("FluxBridgeTextEncode", "max_sequence_length"): dict(min=1, max=512, default=512),
    ("FluxBridgeEmptyLatent", "width"): dict(min=16, max=16384, step=16, default=1024),
    ("FluxBridgeEmptyLatent", "height"): dict(min=16, max=16384, step=16, default=1024),
    ("FluxBridgeEmptyLatent", "batch_size"): dict(min=1, max=64, default=1),
    ("FluxBridgeScheduler", "steps"): dict(min=1, max=1000, default=28),
    ("FluxBridgeScheduler", "denoise"): dict(min=0.0, max=1.0, default=1.0),
    ("FluxBridgeScheduler", "shift"): dict(options=["auto", "dynamic", "fixed"], default="auto"),
    ("FluxBridgeAddNoise", "seed"): dict(min=0, max=2 ** 64 - 1, default=0),
    ("FluxBridgeSchedulerStep", "step"): dict(min=0, max=999, default=0),
    ("FluxBridgeSchedulerStep", "true_cfg"): dict(min=1.0, max=30.0, default=1.0),
    ("FluxBridgeSampler", "seed"): dict(min=0, max=2 ** 64 - 1, default=0),
    ("FluxBridgeSampler", "steps"): dict(min=1, max=1000, default=28),
    ("FluxBridgeSampler", "denoise"): dict(min=0.0, max=1.0, default=1.0),
    ("FluxBridgeSampler", "true_cfg"): dict(min=1.0, max=30.0, default=1.0),
    ("FluxBridgeVAEDecode", "tiled"): dict(options=["auto", "off", "on"], default="auto"),
    ("FluxBridgeSaveTransformer", "layout"): dict(options=["bfl", "comfy", "diffusers"]),
    ("FluxBridgeSaveTransformer", "dtype"): dict(options=["keep", "bf16", "fp16", "fp32"]),
    ("FluxBridgeSaveTransformer", "filename_prefix"): dict(default="fluxbridge/transformer"),
    ("FluxBridgeSaveVAE", "layout"): dict(options=["bfl", "diffusers"]),
    ("FluxBridgeSaveVAE", "filename_prefix"): dict(default="fluxbridge/vae"),
    ("FluxBridgeConvertLoRA", "to"): dict(options=["diffusers", "bfl", "kohya", "comfy"]),
    ("FluxBridgeConvertLoRA", "filename_prefix"): dict(default="fluxbridge/lora"),
    ("FluxBridgeLoadNativeModel", "weight_dtype"): dict(
        options=["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"], default="default"),
    ("FluxBridgeNativeLoRA", "strength_model"): dict(min=-10.0, max=10.0, default=1.0),
    ("FluxBridgeNativeLoRA", "strength_clip"): dict(min=-10.0, max=10.0, default=1.0),
}


def _io_type(x):
    t = x.get_io_type() if hasattr(x, "get_io_type") else x.io_type
    return str(getattr(t, "value", t))


def test_node_list_is_the_catalogue_in_order():
    assert [c.GET_SCHEMA().node_id for c in NODE_LIST] == list(CATALOGUE)


@pytest.mark.parametrize("cls", NODE_LIST, ids=lambda c: c.__name__)
def test_schema_matches_catalogue(cls):
    schema = cls.GET_SCHEMA()  # finalize + validate: ids unique across inputs and outputs, as ComfyUI checks
    category, inputs, outputs, output_node = CATALOGUE[schema.node_id]
    assert schema.node_id.startswith("FluxBridge")
    assert schema.category == "FluxBridge/" + category
    assert schema.display_name and schema.display_name.startswith("FluxBridge ")
    assert schema.description
    assert [(i.id, _io_type(i), bool(i.optional)) for i in schema.inputs] == inputs
    assert [(o.display_name, _io_type(o)) for o in schema.outputs] == outputs
    assert bool(schema.is_output_node) == output_node
    for inp in schema.inputs:
        for attr, value in WIDGETS.get((schema.node_id, inp.id), {}).items():
            assert getattr(inp, attr) == value, (inp.id, attr)


def test_entrypoint_registers_every_node(comfy_stubs):
    import fluxbridge
    ext = asyncio.run(fluxbridge.comfy_entrypoint())
    assert isinstance(ext, comfy_stubs.api.ComfyExtension)
    assert asyncio.run(ext.get_node_list()) == NODE_LIST


def test_combos_list_the_model_folders(standalone_host, models_dir):
    for rel in ("diffusion_models/flux1-dev.safetensors", "unet/old.safetensors", "text_encoders/clip_l.safetensors",
                "clip/t5xxl_fp16.safetensors", "vae/ae.safetensors", "loras/style.safetensors",
                "style_models/flux1-redux-dev.safetensors", "clip_vision/sigclip_vision_patch14_384.safetensors"):
        (models_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (models_dir / rel).write_bytes(b"")
    (models_dir / "clip_vision" / "siglip-so400m").mkdir()
    (models_dir / "clip_vision" / "siglip-so400m" / "config.json").write_text("{}")
    (models_dir / "diffusion_models" / "FLUX.1-dev").mkdir()
    (models_dir / "diffusion_models" / "FLUX.1-dev" / "model_index.json").write_text("{}")
    by_id = {c.GET_SCHEMA().node_id: c.GET_SCHEMA() for c in NODE_LIST}

    def options(node, name):
        return next(i for i in by_id[node].inputs if i.id == name).options

    assert options("FluxBridgeLoadTransformer", "model_name") == ["FLUX.1-dev", "flux1-dev.safetensors",
                                                                  "old.safetensors"]
    assert options("FluxBridgeLoadTextEncoders", "clip_name") == ["clip_l.safetensors", "t5xxl_fp16.safetensors"]
    assert options("FluxBridgeLoadTextEncoders", "t5_name") == ["clip_l.safetensors", "t5xxl_fp16.safetensors"]
    assert options("FluxBridgeLoadVAE", "vae_name") == ["ae.safetensors"]
    assert options("FluxBridgeLoadLoRA", "lora_name") == ["style.safetensors"]
    assert options("FluxBridgeConvertLoRA", "lora_name") == ["style.safetensors"]
    assert options("FluxBridgeNativeLoRA", "lora_name") == ["style.safetensors"]
    assert options("FluxBridgeLoadNativeModel", "model_name") == options("FluxBridgeLoadTransformer", "model_name")
    assert options("FluxBridgeLoadRedux", "redux_name") == ["flux1-redux-dev.safetensors"]
    assert options("FluxBridgeLoadRedux", "clip_vision_name") == ["sigclip_vision_patch14_384.safetensors",
                                                                  "siglip-so400m"]


def test_names_are_refused_when_the_prompt_is_validated(standalone_host):
    """ComfyUI 0.3.x does not check a V3 combo value against its options at /prompt, so the nodes that
    take file names or a filename_prefix check them in `validate_inputs` (a refused prompt runs nothing)."""
    from fluxbridge.nodes import NODE_LIST
    nodes = {n.define_schema().node_id: n for n in NODE_LIST}
    load, save, lora = nodes["FluxBridgeLoadTransformer"], nodes["FluxBridgeSaveTransformer"], nodes["FluxBridgeConvertLoRA"]
    assert "outside the diffusion_models folder" in load.validate_inputs(model_name="../../etc/passwd")
    assert "outside the diffusion_models folder" in load.validate_inputs(model_name="/etc/passwd")
    assert "not found" in load.validate_inputs(model_name="missing.safetensors")
    assert load.validate_inputs() is True  # a linked input is not passed at validation time
    assert "outside the output folder" in save.validate_inputs(filename_prefix="../escape")
    assert save.validate_inputs(filename_prefix="fluxbridge/ok") is True
    assert "outside the loras folder" in lora.validate_inputs(lora_name="../x")
    encoders = nodes["FluxBridgeLoadTextEncoders"]
    assert encoders.validate_inputs(clip_name=None, t5_name=None) is True
    assert encoders.validate_inputs(clip_name="../c", t5_name=None).startswith("clip_name: ../c: a '..' part")
    assert encoders.validate_inputs(clip_name=None, t5_name="/t5").startswith("t5_name: /t5: an absolute path")
    redux = nodes["FluxBridgeLoadRedux"]
    assert redux.validate_inputs(redux_name=None, clip_vision_name=None) is True
    assert redux.validate_inputs(redux_name="../r", clip_vision_name=None).startswith("redux_name: ../r: a '..' part")
    assert redux.validate_inputs(redux_name=None, clip_vision_name="x.safetensors").startswith(
        "clip_vision_name: x.safetensors: not found in the clip_vision folder")


def test_a_validation_error_is_reported_against_its_own_input():
    """ComfyUI (0.3.64 `execution.validate_inputs`) reports a `validate_inputs` that does not return True
    against every input the function takes. So each node's `validate_inputs` takes only the one input it
    checks; FluxBridgeConvertLoRA checks its filename_prefix when it runs. The exceptions, the loaders of two
    model files (FluxBridgeLoadTextEncoders, FluxBridgeLoadRedux), name the input at fault in their message
    (test above)."""
    from fluxbridge.nodes import NODE_LIST
    taken = {}
    for node in NODE_LIST:
        if "validate_inputs" in vars(node):
            params = inspect.signature(node.validate_inputs).parameters
            taken[node.define_schema().node_id] = [p for p in params if p != "cls"]
    assert taken == {
        "FluxBridgeLoadTransformer": ["model_name"], "FluxBridgeLoadTextEncoders": ["clip_name", "t5_name"],
        "FluxBridgeLoadVAE": ["vae_name"], "FluxBridgeLoadLoRA": ["lora_name"],
        "FluxBridgeSaveTransformer": ["filename_prefix"], "FluxBridgeSaveVAE": ["filename_prefix"],
        "FluxBridgeConvertLoRA": ["lora_name"], "FluxBridgeLoadRedux": ["redux_name", "clip_vision_name"],
        "FluxBridgeNativeLoRA": ["lora_name"], "FluxBridgeLoadNativeModel": ["model_name"]}
