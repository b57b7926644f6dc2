"""The FLUX.1 family in the graph: Kontext, Depth/Canny (full model and control LoRA) and Redux, run through our
nodes on small random models written in their published layouts, against diffusers' own pipelines on the
same modules (CPU, float32, the real CLIP-L / T5 tokenizers). Images must agree within 1/255 per pixel.

Each diffusers pipeline gets what ComfyUI's graph gives ours: the same seed (the noise is the first draw of a
CPU generator seeded with it), the same steps and guidance. Where the pipeline draws from the generator before
the noise (FluxControlPipeline samples the control image's posterior), it is handed the noise (`latents=`) and
the control image's latents encoded with the posterior mean, as ComfyUI's VAEEncode and our node encode it.
Also: native interop (ComfyUI's ReferenceLatent stand-in gives what our node gives), a control LoRA comes off
bitwise, and bad combinations are refused naming both parts.
"""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.common.errors import BadInput
from fluxbridge.headless import demo, factory
from fluxbridge.headless.native_nodes import reference_latent
from fluxbridge.nodes import conditioning, image as image_nodes, latent, loaders, sampling
from fluxbridge.pipeline import kontext as kontext_lib
from fluxbridge.runtime import host, models
from node_graph import copy_tokenizers, run  # tests/helpers
from parity import image_diff, pipe as _pipe  # tests/helpers

TOKENIZERS = models.PACK_TOKENIZERS  # the real CLIP-L / T5 tokenizers the pack carries
PROMPT = "make the sky a warm sunset"
STEPS, SEED, TOL = 3, 11, 1 / 255
T5_TOKENS = 128  # the pipelines are given the same max_sequence_length (Redux's prior always encodes 512)
NAMES = dict(dev="flux1-dev.safetensors", kontext="flux1-kontext-dev.safetensors",
             depth="flux1-depth-dev.safetensors", vae="ae.safetensors", clip="clip_l.safetensors",
             t5="t5xxl_fp16.safetensors", lora="flux1-canny-dev-lora.safetensors",
             redux="flux1-redux-dev.safetensors", siglip="sigclip_vision_patch14_384.safetensors")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _components(variant):
    return factory.tiny_pipeline_components(variant, tokenizers=TOKENIZERS)


@pytest.fixture(scope="module")
def parts():
    dev = _components("dev")
    cfg = dev["transformer"].config
    depth = factory.tiny_flux_transformer(width=cfg.num_attention_heads * cfg.attention_head_dim,
                                          heads=cfg.num_attention_heads, in_channels=128, seed=1,
                                          joint_attention_dim=cfg.joint_attention_dim,
                                          pooled_projection_dim=cfg.pooled_projection_dim)
    return dict(dev=dev, depth=dict(dev, transformer=depth), siglip=factory.tiny_siglip(seed=21),
                redux=factory.tiny_redux(redux_dim=48, text_width=32, seed=22))


@pytest.fixture(scope="module")
def family_models(parts, tmp_path_factory):
    """A models folder in the published layouts: the dev transformer also as flux1-kontext-dev (Kontext has dev's
    shapes), the full Depth model, a BFL control LoRA, Redux + SigLIP, and files that do not fit."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("family-models")
    dev, depth = parts["dev"], parts["depth"]
    for name, model, layout, folder in (
            ("dev", dev["transformer"], "bfl", "diffusion_models"),
            ("kontext", dev["transformer"], "bfl", "diffusion_models"),
            ("depth", depth["transformer"], "bfl", "diffusion_models"),
            ("vae", dev["vae"], "bfl", "vae"),
            ("clip", dev["text_encoder"], "comfy", "text_encoders"),
            ("t5", dev["text_encoder_2"], "comfy", "text_encoders"),
            ("siglip", parts["siglip"], "bfl", "clip_vision"),
            ("redux", parts["redux"], "bfl", "style_models")):
        factory.save_layout(model, root / folder / NAMES[name], layout)
    factory.save_layout(factory.tiny_flux_vae(latent_channels=4, seed=4), root / "vae" / "sd_vae.safetensors", "bfl")
    factory.save_layout(factory.tiny_redux(redux_dim=48, text_width=48, seed=23),
                        root / "style_models" / "redux_wide.safetensors", "bfl")
    factory.save_layout(factory.tiny_redux(redux_dim=64, text_width=32, seed=24),
                        root / "style_models" / "redux_for_64.safetensors", "bfl")
    clip_vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=3, image_size=32, patch_size=8))
    save_file({"vision_model." + k.removeprefix("vision_model."): v.contiguous()
               for k, v in clip_vision.state_dict().items()}, str(root / "clip_vision" / "clip_vision_vit.safetensors"))
    shutil.copy(root / "text_encoders" / NAMES["t5"], root / "clip_vision" / "t5_by_mistake.safetensors")
    (root / "loras").mkdir()
    save_file(demo.tiny_control_lora(dev["transformer"], seed=3), str(root / "loras" / NAMES["lora"]))
    copy_tokenizers(TOKENIZERS, root)
    return root


@pytest.fixture
def models_dir(family_models):
    return family_models


def _picture(h, w, seed):
    """A smooth random picture: IMAGE [1, H, W, 3] in 0..1."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(h // 8, 1), max(w // 8, 1), generator=g)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear").permute(0, 2, 3, 1).contiguous()


def _load(model="kontext", variant="auto"):
    (tr,), tr_ui = run(loaders.LoadTransformer, model_name=NAMES[model], weight_dtype="default", quantize="none",
                       variant=variant)
    (te,), _ = run(loaders.LoadTextEncoders, clip_name=NAMES["clip"], t5_name=NAMES["t5"], weight_dtype="default")
    (vae,), _ = run(loaders.LoadVAE, vae_name=NAMES["vae"])
    return tr, te, vae, tr_ui


def _encode(te, guidance, tokens=T5_TOKENS):
    (cond,), _ = run(conditioning.TextEncode, text_encoders=te, clip_text=PROMPT, t5_text="", guidance=guidance,
                     max_sequence_length=tokens)
    return cond


def _sample_decode(tr, vae, cond, lat):
    (out,), _ = run(sampling.Sampler, transformer=tr, positive=cond, latent=lat, seed=SEED, steps=STEPS, denoise=1.0,
                    true_cfg=1.0)
    (img,), _ = run(latent.VAEDecode, vae=vae, latent=out, tiled="off")
    return img


def _bchw(x):
    return x.permute(0, 3, 1, 2)


def _noise(h, w):
    """What FluxPipeline draws first from a generator seeded with SEED, packed (for `latents=`)."""
    from fluxbridge import pipeline as P
    return P.pack(torch.randn(1, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(SEED)))


# -------------------------------------------------------------------------------------------- Kontext

def test_kontext_one_and_two_references_match_flux_kontext_pipeline(on_host, parts):
    from diffusers import FluxKontextPipeline
    from fluxbridge import pipeline as P

    tr, te, vae, tr_ui = _load("kontext")
    assert tr_ui["fluxbridge"][0]["variant"] == "kontext"
    ref1, ref2 = _picture(64, 80, 1), _picture(48, 80, 2)  # same width: the second goes below the first
    cond = _encode(te, 2.5)
    (cond1, lat), ui = run(conditioning.KontextReference, vae=vae, conditioning=cond, image=ref1)
    assert lat["samples"].shape == (1, 16, 8, 10) and "reference 1: 80x64" in ui["text"][0]
    refs = cond1[0][1]["reference_latents"]  # native form: raw latents, appended
    assert len(refs) == 1 and refs[0].shape == (1, 16, 8, 10) and "reference_latents" not in cond[0][1]
    (cond2, _), ui = run(conditioning.KontextReference, vae=vae, conditioning=cond1, image=ref2)
    assert len(cond2[0][1]["reference_latents"]) == 2 and torch.equal(cond2[0][1]["reference_latents"][0], refs[0])
    ours1 = _sample_decode(tr, vae, cond1, lat)
    ours2 = _sample_decode(tr, vae, cond2, lat)

    dev = parts["dev"]
    pipe = _pipe(FluxKontextPipeline, dev)
    kw = dict(prompt=PROMPT, height=64, width=80, max_area=64 * 80, num_inference_steps=STEPS, guidance_scale=2.5,
              max_sequence_length=T5_TOKENS, output_type="pt")
    theirs1 = pipe(image=_bchw(ref1), _auto_resize=False, generator=torch.Generator().manual_seed(SEED), **kw).images
    # diffusers takes one image: two references stitched the way both are placed (ids of one taller image)
    stitched = P.process_in(torch.cat(cond2[0][1]["reference_latents"], dim=2), dev["vae"])
    theirs2 = pipe(image=stitched, generator=torch.Generator().manual_seed(SEED), **kw).images
    d1, d2 = image_diff(ours1, theirs1), image_diff(ours2, theirs2)
    print(f"Kontext max |diff|: one reference {d1:.3g}, two references {d2:.3g}")
    assert d1 <= TOL and d2 <= TOL
    assert (ours1 - ours2).abs().max() > TOL  # the second reference was read


def test_reference_from_the_native_reference_latent_node_gives_the_same_image(on_host):
    """ComfyUI's ReferenceLatent (its headless stand-in) on our VAE Encode's LATENT = our reference node."""
    tr, te, vae, _ = _load("kontext")
    cond = _encode(te, 2.5)
    ref = _picture(64, 64, 3)
    (ours, lat), _ = run(conditioning.KontextReference, vae=vae, conditioning=cond, image=ref)
    (encoded,), _ = run(latent.VAEEncode, vae=vae, image=ref)
    (native,), _ = reference_latent(None, cond, encoded)
    assert torch.equal(native[0][1]["reference_latents"][0], ours[0][1]["reference_latents"][0])
    assert torch.equal(_sample_decode(tr, vae, native, lat), _sample_decode(tr, vae, ours, lat))


def test_reference_placement_methods():
    """offset (stitched canvas: right of or below what is there), index (k-th reference at index k), uxo."""
    refs = [torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 6, 4)]
    _, ids = kontext_lib.reference_tokens(refs, "offset", 1, (4, 4))
    first, second, third = ids[:16], ids[16:32], ids[32:]
    assert (ids[:, 0] == 1).all()
    assert first[:, 1].max() == 3 and second[:, 1].min() == 4 and second[:, 2].min() == 0  # below
    assert third[:, 2].min() == 4 and third[:, 1].min() == 0  # then right of the 16x8 canvas
    _, ids = kontext_lib.reference_tokens(refs, "index", 1, (4, 4))
    assert ids[:16, 0].unique().tolist() == [1] and ids[16:32, 0].unique().tolist() == [2]
    assert ids[32:, 0].unique().tolist() == [3] and ids[:, 1].min() == 0
    _, ids = kontext_lib.reference_tokens(refs, "uxo", 1, (4, 4))
    assert (ids[:, 0] == 0).all() and ids[:16, 1].min() == 4 and ids[16:32, 1].min() == 8


def test_kontext_image_scale_picks_the_preferred_size_as_diffusers(on_host):
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
    assert list(kontext_lib.PREFERRED_RESOLUTIONS) == [tuple(r) for r in PREFERRED_KONTEXT_RESOLUTIONS]
    for w, h in ((64, 64), (96, 64), (40, 100), (1000, 10), (768, 512)):
        (out,), ui = run(image_nodes.KontextImageScale, image=torch.rand(1, h, w, 3))
        _, want_w, want_h = min((abs(w / h - a / b), a, b) for a, b in PREFERRED_KONTEXT_RESOLUTIONS)
        assert out.shape == (1, want_h, want_w, 3) and f"{w}x{h} -> {want_w}x{want_h}" in ui["text"][0]
    # an image of a preferred aspect is only resized: Lanczos through 8-bit values, as ComfyUI's node does
    import numpy as np
    from PIL import Image
    src = _picture(552, 472, 4)  # half of 944x1104
    (out,), _ = run(image_nodes.KontextImageScale, image=src)
    want = Image.fromarray((src[0].numpy() * 255).astype(np.uint8)).resize((944, 1104), Image.Resampling.LANCZOS)
    assert torch.equal(out[0], torch.from_numpy(np.array(want).astype(np.float32) / 255))


# -------------------------------------------------------------------------------------------- Depth / Canny

def _control_reference(comps, control, h, w, lora=None):
    from diffusers import FluxControlPipeline
    pipe = _pipe(FluxControlPipeline, comps)
    if lora is not None:
        pipe.load_lora_weights(lora)
    vae = comps["vae"]
    z = vae.encode(2 * _bchw(control) - 1).latent_dist.mode()  # the posterior mean, as ComfyUI's VAEEncode
    from fluxbridge import pipeline as P
    packed = P.pack((z - vae.config.shift_factor) * vae.config.scaling_factor)
    return pipe(prompt=PROMPT, control_image=packed, height=h, width=w, num_inference_steps=STEPS,
                guidance_scale=10.0, latents=_noise(h, w), max_sequence_length=T5_TOKENS, output_type="pt").images


def test_depth_model_matches_flux_control_pipeline(on_host, parts):
    tr, te, vae, tr_ui = _load("depth")
    assert tr_ui["fluxbridge"][0]["variant"] == "depth" and tr.config["in_channels"] == 128
    control = _picture(64, 48, 5)
    (pos, neg, lat), _ = run(conditioning.ControlConditioning, vae=vae, positive=_encode(te, 10.0),
                             control_image=control)
    assert neg is None and lat["samples"].shape == (1, 16, 8, 6) and not lat["samples"].any()
    assert pos[0][1]["concat_latent_image"].shape == (1, 16, 8, 6) and "concat_mask" not in pos[0][1]
    ours = _sample_decode(tr, vae, pos, lat)
    d = image_diff(ours, _control_reference(parts["depth"], control, 64, 48))
    print(f"Depth max |diff|: {d:.3g}")
    assert d <= TOL


def test_dev_with_control_lora_matches_diffusers_and_comes_off_bitwise(on_host, parts):
    dev_tr, te, vae, _ = _load("dev")
    module = dev_tr.module
    before = module.state_dict()
    (tr, _), lora_ui = run(loaders.LoadLoRA, transformer=dev_tr, lora_name=NAMES["lora"], strength_model=1.0,
                           strength_text=1.0)
    assert lora_ui["fluxbridge"][0]["format"] == "bfl-control" and not lora_ui["fluxbridge"][0]["not_placed"]
    assert tr.input_channels() == 128 and dev_tr.input_channels() == 64
    control = _picture(64, 64, 6)
    (pos, _, lat), _ = run(conditioning.ControlConditioning, vae=vae, positive=_encode(te, 10.0),
                           control_image=control)
    with pytest.raises(BadInput, match=r"control image .*'flux1-dev.safetensors' takes no control input"):
        run(sampling.Sampler, transformer=dev_tr, positive=pos, latent=lat, seed=SEED, steps=STEPS)
    ours = _sample_decode(tr, vae, pos, lat)
    assert module.x_embedder.in_features == 128  # the stack stays on while it is the one in use ...
    with dev_tr.patched():  # ... and a use without it sees the base: the tensors, input width and config
        after = module.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert module.x_embedder.in_features == 64 and module.config.in_channels == 64
        assert module.x_embedder.weight.shape == (32, 64)

    comps = dict(parts["dev"], transformer=copy.deepcopy(parts["dev"]["transformer"]))  # diffusers patches in place
    theirs = _control_reference(comps, control, 64, 64, demo.tiny_control_lora(comps["transformer"], seed=3,
                                                                                layout="diffusers"))
    assert comps["transformer"].x_embedder.in_features == 128  # diffusers widened it too
    d = image_diff(ours, theirs)
    print(f"dev + control LoRA max |diff|: {d:.3g}")
    assert d <= TOL
    (other, _, _), _ = run(conditioning.ControlConditioning, vae=vae, positive=_encode(te, 10.0),
                           control_image=_picture(64, 64, 60))
    assert (ours - _sample_decode(tr, vae, other, lat)).abs().max() > TOL  # the control image is read


# -------------------------------------------------------------------------------------------- Redux

def test_redux_matches_prior_redux_then_flux_pipeline(on_host, parts):
    import numpy as np
    from PIL import Image
    from diffusers import FluxPipeline, FluxPriorReduxPipeline
    from transformers import SiglipImageProcessor

    tr, te, vae, _ = _load("dev")
    (redux,), ui = run(loaders.LoadRedux, redux_name=NAMES["redux"], clip_vision_name=NAMES["siglip"])
    assert redux.image_size == 32 and redux.text_width == 32
    assert [c["family"] for c in ui["fluxbridge"][0]["components"]] == ["flux-redux", "siglip-vision"]
    pixels = (_picture(32, 32, 7)[0].numpy() * 255).round().astype(np.uint8)
    cond = _encode(te, 3.5, tokens=512)
    (with_redux,), _ = run(conditioning.ReduxConditioning, conditioning=cond, redux=redux,
                           image=torch.from_numpy(pixels / np.float32(255))[None], strength=1.0, crop="center")
    assert with_redux[0][0].shape == (1, 512 + 16, 32) and torch.equal(with_redux[0][0][:, :512], cond[0][0])
    (empty,), _ = run(latent.EmptyLatent, width=64, height=64, batch_size=1)
    ours = _sample_decode(tr, vae, with_redux, empty)

    dev = parts["dev"]
    prior = FluxPriorReduxPipeline(image_encoder=parts["siglip"], image_embedder=parts["redux"],
                                   feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                                   text_encoder=dev["text_encoder"], tokenizer=dev["tokenizer"],
                                   text_encoder_2=dev["text_encoder_2"], tokenizer_2=dev["tokenizer_2"])
    embeds, pooled = prior(Image.fromarray(pixels), prompt=PROMPT, return_dict=False)
    theirs = _pipe(FluxPipeline, dev)(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=64, width=64,
                                        num_inference_steps=STEPS, guidance_scale=3.5,
                                        generator=torch.Generator().manual_seed(SEED), output_type="pt").images
    d = image_diff(ours, theirs)
    print(f"Redux max |diff|: {d:.3g}")
    assert d <= TOL
    assert (ours - _sample_decode(tr, vae, cond, empty)).abs().max() > TOL  # the image tokens were read
    (half,), _ = run(conditioning.ReduxConditioning, conditioning=cond, redux=redux,
                     image=torch.from_numpy(pixels / np.float32(255))[None], strength=0.5, crop="center")
    torch.testing.assert_close(half[0][0][:, 512:], with_redux[0][0][:, 512:] * 0.5)  # strength: image tokens only
    assert torch.equal(half[0][0][:, :512], cond[0][0])


def test_siglip_from_a_transformers_folder(on_host, parts, tmp_path):
    folder = on_host / "clip_vision" / "siglip-tiny"
    parts["siglip"].save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    try:
        (redux,), ui = run(loaders.LoadRedux, redux_name=NAMES["redux"], clip_vision_name="siglip-tiny")
        (single,), _ = run(loaders.LoadRedux, redux_name=NAMES["redux"], clip_vision_name=NAMES["siglip"])
        x = torch.rand(1, 3, 32, 32)
        torch.testing.assert_close(redux.vision.module(pixel_values=x).last_hidden_state,
                                   single.vision.module(pixel_values=x).last_hidden_state, rtol=0, atol=0)
    finally:
        shutil.rmtree(folder)


# -------------------------------------------------------------------------------------------- errors

def test_bad_combinations_name_both_parts(on_host):
    tr, te, vae, _ = _load("kontext")
    cond = _encode(te, 2.5)
    # a Kontext reference whose latent channels do not fit (encoded with a 4-channel VAE)
    (sd_vae,), _ = run(loaders.LoadVAE, vae_name="sd_vae.safetensors")
    (bad, _), _ = run(conditioning.KontextReference, vae=sd_vae, conditioning=cond, image=_picture(64, 64, 8))
    (empty,), _ = run(latent.EmptyLatent, width=64, height=64, batch_size=1)
    with pytest.raises(BadInput, match=r"Kontext reference 1 has 4 latent channels, the transformer "
                                       r"'flux1-kontext-dev.safetensors' works on 16-channel latents"):
        run(sampling.Sampler, transformer=tr, positive=bad, latent=empty, seed=0, steps=1)
    # references on a model the loader did not take for Kontext; the loader's variant says it is
    (good, _), _ = run(conditioning.KontextReference, vae=vae, conditioning=cond, image=_picture(64, 64, 8))
    dev, _, _, _ = _load("dev")
    with pytest.raises(BadInput, match=r"1 Kontext reference image\(s\), but the transformer 'flux1-dev.safetensors' "
                                       r"is FLUX.1 dev .* set the loader's variant to kontext"):
        run(sampling.Sampler, transformer=dev, positive=good, latent=empty, seed=0, steps=1)
    forced, _, _, ui = _load("dev", variant="kontext")
    assert forced.variant == "kontext" and ui["fluxbridge"][0]["variant"] == "kontext"
    run(sampling.Sampler, transformer=forced, positive=good, latent=empty, seed=0, steps=1)
    with pytest.raises(BadInput, match=r"variant kontext: this is a depth model \(128 input channels"):
        _load("depth", variant="kontext")
    # a control image with a model that takes none
    (ctrl, _, lat), _ = run(conditioning.ControlConditioning, vae=vae, positive=cond, control_image=_picture(64, 64, 9))
    with pytest.raises(BadInput, match=r"control image \(concat_latent_image\), but the transformer "
                                       r"'flux1-kontext-dev.safetensors' takes no control input \(64 input channels"):
        run(sampling.Sampler, transformer=tr, positive=ctrl, latent=lat, seed=0, steps=1)
    # a Redux encoder whose tokens do not fit the conditioning's (the transformer's) text width
    (wide,), _ = run(loaders.LoadRedux, redux_name="redux_wide.safetensors", clip_vision_name=NAMES["siglip"])
    with pytest.raises(BadInput, match=r"the Redux encoder 'redux_wide.safetensors' makes 48-wide tokens, but the "
                                       r"conditioning's text states are 32 wide"):
        run(conditioning.ReduxConditioning, conditioning=cond, redux=wide, image=_picture(32, 32, 1))
    with pytest.raises(BadInput, match=r"redux_for_64.safetensors: the Redux encoder takes 64-wide image features, "
                                       r"but the vision tower 'sigclip_vision_patch14_384.safetensors' makes 48"):
        run(loaders.LoadRedux, redux_name="redux_for_64.safetensors", clip_vision_name=NAMES["siglip"])
    # a SigLIP file that is not SigLIP
    with pytest.raises(BadInput, match=r"clip_vision_vit.safetensors: a CLIP vision tower .* not SigLIP"):
        run(loaders.LoadRedux, redux_name=NAMES["redux"], clip_vision_name="clip_vision_vit.safetensors")
    with pytest.raises(BadInput, match=r"t5_by_mistake.safetensors: not siglip-vision: found t5-xxl"):
        run(loaders.LoadRedux, redux_name=NAMES["redux"], clip_vision_name="t5_by_mistake.safetensors")
    with pytest.raises(BadInput, match=r"not flux-redux: found siglip-vision"):
        models.load_redux(host.model_path("clip_vision", NAMES["siglip"]), host.model_path("clip_vision", NAMES["siglip"]))


# -------------------------------------------------------------------------------------------- families

def test_redux_and_siglip_configs_come_from_the_shapes():
    """At the released sizes (shapes only): Redux 1152 -> 3 x 4096 -> 4096; SigLIP so400m-patch14-384."""
    from fluxbridge.convert.families import redux, siglip
    assert redux.infer_config({"redux_up.weight": (12288, 1152), "redux_down.weight": (4096, 12288)}, "a") == \
        {"redux_dim": 1152, "txt_in_features": 4096}
    with pytest.raises(ValueError, match="not 3 x the output width"):
        redux.infer_config({"redux_up.weight": (100, 1152), "redux_down.weight": (50, 100)}, "a")
    shapes = {"vision_model.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
              "vision_model.embeddings.position_embedding.weight": (729, 1152),
              **{f"vision_model.encoder.layers.{i}.mlp.fc1.weight": (4304, 1152) for i in range(27)}}
    cfg = siglip.infer_config(shapes, "a")
    assert (cfg["image_size"], cfg["patch_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["intermediate_size"], cfg["vision_use_head"]) == (384, 14, 27, 16, 4304, False)
    assert siglip.default_heads(768) == 12 and siglip.default_heads(1024) == 16 and siglip.default_heads(48) == 3


def test_inspect_names_the_new_families(family_models):
    from fluxbridge.convert.inspect import inspect_path
    info = inspect_path(family_models / "style_models" / NAMES["redux"])
    assert (info["family"], info["layout"], info["config"]) == ("flux-redux", "bfl",
                                                                {"redux_dim": 48, "txt_in_features": 32})
    info = inspect_path(family_models / "clip_vision" / NAMES["siglip"])
    assert (info["family"], info["layout"], info["config"]["image_size"], info["warnings"]) == \
        ("siglip-vision", "comfy", 32, [])
