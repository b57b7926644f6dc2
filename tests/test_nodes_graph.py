"""Our nodes executed one by one, as ComfyUI (or the runner) would: tiny random models written to a models
folder in their usual layouts, the real CLIP-L / T5 tokenizers (the pack's own copies), CPU float32.

What is proven: a whole text-to-image graph gives an IMAGE of the right shape; a second run reuses the
cached models and gives the same image bit for bit; a LoRA changes the image, stays applied while its
stack is used, and a use without it sees the base bitwise unchanged (also after an interrupt in the middle of sampling, after which a run equals a fresh
run); the scheduler-step node chained over every step equals the sampler; the convert nodes write what
the library writes; bad inputs are refused with messages that name both parts.
"""
import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.headless import factory
from fluxbridge.runtime import host, models
from fluxbridge.common.errors import BadInput
from fluxbridge.nodes import conditioning, convert, latent, loaders, sampling
from model_state import assert_same_state, snapshot  # tests/helpers
from node_graph import copy_tokenizers, run  # tests/helpers

TOKENIZERS = models.PACK_TOKENIZERS
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407], [3, 9, 1202, 13, 3, 9, 1712, 1]  # CLIP-L, T5
SIZE, STEPS, SEED = 64, 3, 7
PROMPT = "a photo of a cat"
NAMES = dict(model_name="flux1-dev.safetensors", clip_name="clip_l.safetensors", t5_name="t5xxl_fp16.safetensors",
             vae_name="ae.safetensors", lora_name="flux_lora.safetensors")
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A models folder: dev and fill transformers (BFL layout), FLUX VAE and a 4-channel VAE (BFL), CLIP-L and
    T5 (ComfyUI files), a kohya LoRA, and the real tokenizers under tokenizers/ (the models folder's own
    tokenizers, which win over the pack's)."""
    from fluxbridge.headless.demo import tiny_lora

    root = tmp_path_factory.mktemp("nodes-models")
    width = 32
    dev = factory.tiny_flux_transformer(width=width, heads=2, joint_attention_dim=width, pooled_projection_dim=width,
                                        init_std=0.05, seed=1)
    fill = factory.tiny_flux_transformer(width=width, heads=2, in_channels=384, joint_attention_dim=width,
                                         pooled_projection_dim=width, init_std=0.05, seed=2)
    factory.save_layout(dev, root / "diffusion_models" / NAMES["model_name"], "bfl")
    factory.save_layout(fill, root / "diffusion_models" / "flux1-fill-dev.safetensors", "bfl")
    factory.save_layout(factory.tiny_flux_vae(seed=3), root / "vae" / NAMES["vae_name"], "bfl")
    factory.save_layout(factory.tiny_flux_vae(latent_channels=4, seed=4), root / "vae" / "sd_vae.safetensors", "bfl")
    factory.save_layout(factory.tiny_clip_l(hidden_size=width, seed=5), root / "text_encoders" / NAMES["clip_name"],
                        "comfy")
    factory.save_layout(factory.tiny_t5(d_model=width, seed=6), root / "text_encoders" / NAMES["t5_name"], "comfy")
    (root / "loras").mkdir()
    lora = {k: v * 20 for k, v in tiny_lora(dev, "kohya", seed=8).items() if not k.endswith(".alpha")}
    save_file(lora, str(root / "loras" / NAMES["lora_name"]))
    copy_tokenizers(TOKENIZERS, root)
    return root


@pytest.fixture
def models_dir(tiny_models):
    """The standalone host fixture (conftest `standalone_host`) points at this module's models."""
    return tiny_models


def load(lora_strength=None, weight_dtype="default"):
    (tr,), tr_ui = run(loaders.LoadTransformer, model_name=NAMES["model_name"], weight_dtype=weight_dtype,
                       quantize="none")
    (te,), te_ui = run(loaders.LoadTextEncoders, clip_name=NAMES["clip_name"], t5_name=NAMES["t5_name"],
                       weight_dtype="default")
    (vae,), vae_ui = run(loaders.LoadVAE, vae_name=NAMES["vae_name"])
    lora_ui = None
    if lora_strength is not None:
        (tr, te), lora_ui = run(loaders.LoadLoRA, transformer=tr, lora_name=NAMES["lora_name"],
                                strength_model=lora_strength, strength_text=1.0, text_encoders=te)
    return dict(transformer=tr, text_encoders=te, vae=vae, ui=dict(transformer=tr_ui, text_encoders=te_ui,
                                                                    vae=vae_ui, lora=lora_ui))


def graph(lora_strength=None, steps=STEPS, seed=SEED, size=SIZE, weight_dtype="default"):
    """Loaders → (LoRA) → text encode → empty latent → scheduler → sampler → decode."""
    g = load(lora_strength, weight_dtype)
    (cond,), _ = run(conditioning.TextEncode, text_encoders=g["text_encoders"], clip_text=PROMPT, t5_text="",
                     guidance=3.5, max_sequence_length=128)
    (empty,), _ = run(latent.EmptyLatent, width=size, height=size, batch_size=1)
    (sigmas,), sched_ui = run(sampling.Scheduler, steps=steps, width=size, height=size, denoise=1.0, shift="auto",
                              transformer=g["transformer"])
    (lat,), _ = run(sampling.Sampler, transformer=g["transformer"], positive=cond, latent=empty, seed=seed,
                    steps=steps, denoise=1.0, true_cfg=1.0, sigmas=sigmas)
    (image,), _ = run(latent.VAEDecode, vae=g["vae"], latent=lat, tiled="auto")
    g.update(conditioning=cond, empty=empty, sigmas=sigmas, latent=lat, image=image, scheduler_ui=sched_ui)
    return g


# ------------------------------------------------------------------------------------------------ graph

def test_text_to_image_graph_twice_is_bitwise_equal_and_reuses_models(on_host):
    models.clear_cache()
    loads = models.stats["loads"]
    first = graph()
    image = first["image"]
    assert image.shape == (1, SIZE, SIZE, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    assert first["latent"]["samples"].shape == (1, 16, SIZE // 8, SIZE // 8)
    # what the loaders detected, for the UI (text and the structured payload the web extension reads)
    tr_info = first["ui"]["transformer"]["fluxbridge"][0]
    assert (tr_info["family"], tr_info["layout"], tr_info["variant"], tr_info["dtype"]) == \
        ("flux-transformer", "bfl", "dev", "float32")
    assert tr_info["cached"] is False and "flux-transformer" in first["ui"]["transformer"]["text"][0]
    te_info = first["ui"]["text_encoders"]["fluxbridge"][0]["components"]
    assert [(c["family"], c["layout"]) for c in te_info] == [("clip-l", "comfy"), ("t5-xxl", "comfy")]
    assert all(c["tokenizer"].startswith(f"the models folder ({on_host / 'tokenizers'}") for c in te_info)
    assert first["ui"]["vae"]["fluxbridge"][0]["config"]["latent_channels"] == 16
    sig = first["scheduler_ui"]["sigmas"]
    assert len(sig) == STEPS + 1 and sig[0] == 1.0 and sig[-1] == 0.0
    assert models.stats["loads"] > loads

    loads = models.stats["loads"]
    second = graph()
    assert models.stats["loads"] == loads  # nothing loaded again
    assert second["ui"]["transformer"]["fluxbridge"][0]["cached"] is True
    assert second["transformer"].module is first["transformer"].module
    assert second["text_encoders"].t5.module is first["text_encoders"].t5.module
    assert second["vae"].module is first["vae"].module
    assert torch.equal(second["image"], image)


def test_changed_file_is_loaded_again(on_host, tmp_path):
    import os
    models.clear_cache()
    a, _ = models.load_vae(host.model_path("vae", NAMES["vae_name"]))
    b, hit = models.load_vae(host.model_path("vae", NAMES["vae_name"]))
    assert hit and b is a
    path = Path(host.model_path("vae", NAMES["vae_name"]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    try:
        c, hit = models.load_vae(str(path))
        assert not hit and c is not a
        assert len(models.cache_keys("vae")) == 1  # the stale entry was dropped
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_lora_applies_and_the_base_is_clean_wherever_it_is_used_without(on_host):
    plain = graph()
    base = plain["transformer"]
    before_tr = snapshot(base.module)
    before_clip = snapshot(plain["text_encoders"].clip.module)
    with_lora = graph(lora_strength=1.0)
    tr = with_lora["transformer"]
    assert tr.module is base.module and tr.loras and not base.loras  # one base, the stack rides along
    assert [e.name for e in tr.loras] == [NAMES["lora_name"]]
    report = with_lora["ui"]["lora"]["fluxbridge"][0]
    assert report["format"] and report["patched"] and report["not_placed"] == []
    assert "format" in with_lora["ui"]["lora"]["text"][0]
    assert not torch.equal(with_lora["image"], plain["image"])  # the LoRA did something
    assert models.applied_handle(base.module) is not None  # the stack stays on until another needs the base
    with base.patched() as module:  # the LoRA-free use sees the base, bitwise
        assert_same_state(module, before_tr)
    with plain["text_encoders"].patched() as encoders:
        assert_same_state(encoders.clip.module, before_clip)
    assert models.applied_handle(base.module) is None
    again = graph()  # the LoRA-free branch after the LoRA branch: as before
    assert torch.equal(again["image"], plain["image"])
    zero = graph(lora_strength=0.0)
    assert torch.equal(zero["image"], plain["image"])
    assert torch.equal(graph(lora_strength=1.0)["image"], with_lora["image"])  # and the LoRA again


def test_interrupt_during_sampling_leaves_the_model_usable(on_host, monkeypatch):
    fresh = graph(lora_strength=1.0)
    base = snapshot(fresh["transformer"].module)
    calls = {"n": 0}
    original = host.check_interrupt

    def interrupt_at_step_2():
        calls["n"] += 1
        if calls["n"] == 2:
            raise host.Interrupted("interrupted")
        original()

    g = load(lora_strength=1.0)
    monkeypatch.setattr(host, "check_interrupt", interrupt_at_step_2)
    with pytest.raises(host.Interrupted):
        run(sampling.Sampler, transformer=g["transformer"], positive=fresh["conditioning"], latent=fresh["empty"],
            seed=SEED, steps=STEPS, denoise=1.0, true_cfg=1.0, sigmas=fresh["sigmas"])
    assert calls["n"] == 2
    monkeypatch.setattr(host, "check_interrupt", original)
    assert_same_state(g["transformer"].module, base)  # LoRA patches removed on the way out
    after = graph(lora_strength=1.0)
    assert torch.equal(after["image"], fresh["image"])


def test_scheduler_steps_chained_equal_the_sampler(on_host):
    g = graph(lora_strength=0.7, steps=4)
    (noised,), _ = run(sampling.AddNoise, latent=g["empty"], sigmas=g["sigmas"], seed=SEED)
    x = noised
    for step in range(4):
        (x,), _ = run(sampling.SchedulerStep, transformer=g["transformer"], positive=g["conditioning"], latent=x,
                      sigmas=g["sigmas"], step=step, true_cfg=1.0)
    assert x["samples"].shape == g["latent"]["samples"].shape
    torch.testing.assert_close(x["samples"], g["latent"]["samples"], rtol=0, atol=1e-5)
    # the sampler's own schedule (no sigmas input) is the scheduler's for the latent's size
    (own,), _ = run(sampling.Sampler, transformer=g["transformer"], positive=g["conditioning"], latent=g["empty"],
                    seed=SEED, steps=4, denoise=1.0, true_cfg=1.0)
    assert torch.equal(own["samples"], g["latent"]["samples"])
    with pytest.raises(BadInput, match="step 4 is outside the schedule of 4 step"):
        run(sampling.SchedulerStep, transformer=g["transformer"], positive=g["conditioning"], latent=x,
            sigmas=g["sigmas"], step=4, true_cfg=1.0)


def test_true_cfg_and_img2img(on_host):
    g = load()
    (pos,), _ = run(conditioning.TextEncode, text_encoders=g["text_encoders"], clip_text=PROMPT, t5_text="",
                    guidance=3.5, max_sequence_length=64)
    (neg,), _ = run(conditioning.TextEncode, text_encoders=g["text_encoders"], clip_text="blurry", t5_text="",
                    guidance=3.5, max_sequence_length=64)
    (empty,), _ = run(latent.EmptyLatent, width=SIZE, height=SIZE, batch_size=2)
    common = dict(transformer=g["transformer"], positive=pos, seed=SEED, steps=2)
    (plain,), _ = run(sampling.Sampler, latent=empty, denoise=1.0, true_cfg=1.0, **common)
    (cfg,), _ = run(sampling.Sampler, latent=empty, denoise=1.0, true_cfg=4.0, negative=neg, **common)
    assert plain["samples"].shape == (2, 16, SIZE // 8, SIZE // 8)
    assert not torch.equal(plain["samples"], cfg["samples"])
    (image,), _ = run(latent.VAEDecode, vae=g["vae"], latent=plain, tiled="on")
    (encoded,), _ = run(latent.VAEEncode, vae=g["vae"], image=image)
    assert encoded["samples"].shape == plain["samples"].shape
    (img2img,), _ = run(sampling.Sampler, latent=encoded, denoise=0.5, true_cfg=1.0, **common)
    assert img2img["samples"].shape == encoded["samples"].shape and torch.isfinite(img2img["samples"]).all()


def test_fill_conditioning_and_sampling(on_host):
    from fluxbridge.pipeline import fill as fill_lib

    g = load()
    (tr,), tr_ui = run(loaders.LoadTransformer, model_name="flux1-fill-dev.safetensors", weight_dtype="default",
                       quantize="none")
    assert tr_ui["fluxbridge"][0]["variant"] == "fill"
    (pos,), _ = run(conditioning.TextEncode, text_encoders=g["text_encoders"], clip_text=PROMPT, t5_text="",
                    guidance=30.0, max_sequence_length=64)
    y, x = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2], -1)[None]
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 16:48, 16:48] = 1.0
    (pos2, neg2, lat), _ = run(conditioning.FillConditioning, vae=g["vae"], positive=pos, image=image, mask=mask)
    assert neg2 is None and lat["samples"].shape == (1, 16, SIZE // 8, SIZE // 8)
    extra = pos2[0][1]
    assert extra["concat_latent_image"].shape == (1, 16, SIZE // 8, SIZE // 8)
    assert torch.equal(extra["concat_mask"], mask)
    # the native keys give what diffusers' FluxFillPipeline feeds the model
    ours = fill_lib.from_native_conditioning(extra, lat["samples"].shape, 320)
    want = fill_lib.fill_conditioning(g["vae"].module, image, mask)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    (out,), _ = run(sampling.Sampler, transformer=tr, positive=pos2, latent=lat, seed=SEED, steps=2, denoise=1.0,
                    true_cfg=1.0)
    (img,), _ = run(latent.VAEDecode, vae=g["vae"], latent=out, tiled="auto")
    assert img.shape == (1, SIZE, SIZE, 3)


def test_fp8_storage_steps_and_lora_comes_off(on_host):
    """fp8 weights with upcast compute: a LoRA goes on as forward hooks (the weights stay fp8) and comes off."""
    g = load(lora_strength=1.0, weight_dtype="fp8_e4m3fn")
    tr = g["transformer"]
    assert "fp8_e4m3fn" in tr.storage and tr.dtype == "float32"
    assert tr.module.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    snap = snapshot(tr.module)
    (cond,), _ = run(conditioning.TextEncode, text_encoders=g["text_encoders"], clip_text=PROMPT, t5_text="",
                     guidance=3.5, max_sequence_length=64)
    (empty,), _ = run(latent.EmptyLatent, width=SIZE, height=SIZE, batch_size=1)
    (sig,), _ = run(sampling.Scheduler, steps=2, width=SIZE, height=SIZE, denoise=1.0, shift="auto", transformer=tr)
    (x,), _ = run(sampling.AddNoise, latent=empty, sigmas=sig, seed=SEED)

    def hooks():
        return sum(len(m._forward_hooks) for m in tr.module.modules())
    with dataclasses.replace(tr, loras=()).patched():
        before = hooks()
    for step in range(2):
        (x,), _ = run(sampling.SchedulerStep, transformer=tr, positive=cond, latent=x, sigmas=sig, step=step)
    assert torch.isfinite(x["samples"]).all()
    assert_same_state(tr.module, snap)  # the weights stayed fp8, bitwise
    assert hooks() > before  # the stack stays on (as forward hooks) ...
    with dataclasses.replace(tr, loras=()).patched():
        assert hooks() == before  # ... until a use without it: the LoRA hooks are gone
        assert_same_state(tr.module, snap)


def test_fp8_storage_samples(on_host):
    g = graph(steps=2, weight_dtype="fp8_e4m3fn")
    assert torch.isfinite(g["image"]).all()


# ------------------------------------------------------------------------------------------------ save

def test_save_nodes_write_in_the_output_folder(on_host, tmp_path):
    from fluxbridge.convert.load import load_model
    from fluxbridge.convert.lora.apply import apply_loras
    from fluxbridge.convert.lora.formats import load_lora

    g = load(lora_strength=0.5)
    out = tmp_path / "output"
    _, ui = run(convert.SaveTransformer, transformer=g["transformer"], layout="bfl", dtype="keep",
                filename_prefix="fluxbridge/baked")
    written = out / "fluxbridge" / "baked_00001_.safetensors"
    assert written.is_file() and str(written) in ui["text"][0]
    baked = load_model(written).model.state_dict()
    with apply_loras(g["transformer"].module, "flux-transformer", [(g["transformer"].loras[0].lora, 0.5)]):
        patched = snapshot(g["transformer"].module)
    assert baked.keys() == patched.keys()
    for k in patched:  # baked == applied in memory, bitwise
        assert torch.equal(baked[k], patched[k]), k

    _, ui = run(convert.SaveTransformer, transformer=g["transformer"], layout="diffusers", dtype="bf16",
                filename_prefix="fluxbridge/t")
    folder = out / "fluxbridge" / "t_00001_"
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert load_model(folder).report["dtype"] == "bfloat16"

    # the written folder, as a diffusers pipeline folder in a models folder, loads through the loader
    pipe = tmp_path / "models2" / "diffusion_models" / "FLUX.1-tiny"
    shutil.copytree(folder, pipe / "transformer")
    (pipe / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    host.set_models_dir(tmp_path / "models2")
    (again,), tr_ui = run(loaders.LoadTransformer, model_name="FLUX.1-tiny", weight_dtype="fp32", quantize="none")
    assert tr_ui["fluxbridge"][0]["layout"] == "diffusers" and again.name == "FLUX.1-tiny"
    for k, v in patched.items():  # the LoRA stack baked in, then bf16
        assert torch.equal(again.module.state_dict()[k], v.to(torch.bfloat16).float()), k
    host.set_models_dir(on_host)

    _, ui = run(convert.SaveVAE, vae=g["vae"], layout="diffusers", filename_prefix="fluxbridge/vae")
    vae_back = load_model(out / "fluxbridge" / "vae_00001_").model.state_dict()
    for k, v in g["vae"].module.state_dict().items():
        assert torch.equal(vae_back[k], v), k

    _, ui = run(convert.ConvertLoRA, lora_name=NAMES["lora_name"], to="diffusers", filename_prefix="fluxbridge/lora")
    lora_file = out / "fluxbridge" / "lora_00001_.safetensors"
    assert lora_file.is_file() and str(lora_file) in ui["text"][0]
    assert load_lora(lora_file).parts

    with pytest.raises(BadInput):
        run(convert.SaveVAE, vae=g["vae"], layout="bfl", filename_prefix="../outside")
    assert not (tmp_path / "outside_00001_.safetensors").exists()


# ---------------------------------------------------------------------------------------------- errors

def test_sizes_not_a_multiple_of_16_are_rounded_with_a_note(on_host):
    (lat,), ui = run(latent.EmptyLatent, width=1000, height=512, batch_size=1)
    assert lat["samples"].shape == (1, 16, 64, 124)
    assert "1000x512" in ui["text"][0] and "992x512" in ui["text"][0]
    (sig,), ui = run(sampling.Scheduler, steps=4, width=1000, height=1000, denoise=1.0, shift="dynamic")
    assert "992x992" in ui["text"][0] and len(sig) == 5


def test_mismatched_parts_are_named(on_host):
    g = load()
    (sd_vae,), _ = run(loaders.LoadVAE, vae_name="sd_vae.safetensors")
    assert sd_vae.latent_channels == 4
    (empty,), _ = run(latent.EmptyLatent, width=SIZE, height=SIZE, batch_size=1)
    with pytest.raises(BadInput, match=r"16 channels.*'sd_vae.safetensors' has 4 latent channels"):
        run(latent.VAEDecode, vae=sd_vae, latent=empty, tiled="auto")
    (sd_latent,), _ = run(latent.VAEEncode, vae=sd_vae, image=torch.rand(1, SIZE, SIZE, 3))
    cond = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32), "guidance": 3.5}]]
    with pytest.raises(BadInput, match=r"4 channels, the transformer 'flux1-dev.safetensors' works on 16-channel"):
        run(sampling.Sampler, transformer=g["transformer"], positive=cond, latent=sd_latent, seed=0, steps=1)
    wrong = [[torch.zeros(1, 8, 48), {"pooled_output": torch.zeros(1, 32), "guidance": 3.5}]]
    with pytest.raises(BadInput, match=r"48 wide, the transformer 'flux1-dev.safetensors' expects 32"):
        run(sampling.Sampler, transformer=g["transformer"], positive=wrong, latent=empty, seed=0, steps=1)
    with pytest.raises(BadInput, match="outside"):
        run(loaders.LoadTransformer, model_name="../flux1-dev.safetensors", weight_dtype="default", quantize="none")
    with pytest.raises(BadInput, match="choose one"):
        run(loaders.LoadTransformer, model_name=NAMES["model_name"], weight_dtype="fp8_e4m3fn", quantize="int8")


def test_quantize_int8_with_a_lora(on_host):
    pytest.importorskip("torchao")
    g = load(lora_strength=1.0)
    (tr,), ui = run(loaders.LoadTransformer, model_name=NAMES["model_name"], weight_dtype="default", quantize="int8")
    assert "int8" in ui["fluxbridge"][0]["dtype"]
    (tr, _), _ = run(loaders.LoadLoRA, transformer=tr, lora_name=NAMES["lora_name"], strength_model=1.0,
                     strength_text=1.0)
    (cond,), _ = run(conditioning.TextEncode, text_encoders=g["text_encoders"], clip_text=PROMPT, t5_text="",
                     guidance=3.5, max_sequence_length=64)
    (empty,), _ = run(latent.EmptyLatent, width=SIZE, height=SIZE, batch_size=1)
    (lat,), _ = run(sampling.Sampler, transformer=tr, positive=cond, latent=empty, seed=SEED, steps=2)
    assert torch.isfinite(lat["samples"]).all()


def test_a_models_folder_without_tokenizers_uses_the_packs_own(on_host, tmp_path):
    """A ComfyUI `models` folder as users have it (no tokenizers/): the real tokenizers the pack carries,
    and the loader says so."""
    bare = tmp_path / "bare"
    shutil.copytree(on_host / "text_encoders", bare / "text_encoders")
    host.set_models_dir(bare)
    (te,), ui = run(loaders.LoadTextEncoders, clip_name=NAMES["clip_name"], t5_name=NAMES["t5_name"],
                    weight_dtype="default")
    sources = [c["tokenizer"] for c in ui["fluxbridge"][0]["components"]]
    assert sources == [f"the pack's own copy ({TOKENIZERS / 'clip_l'})", f"the pack's own copy ({TOKENIZERS / 't5xxl'})"]
    assert "the pack's own copy" in ui["text"][0]
    assert (te.tokenizers.clip(PROMPT).input_ids, te.tokenizers.t5(PROMPT).input_ids) == CAT_IDS


def test_missing_tokenizers_say_where_they_were_looked_for(on_host, tmp_path, monkeypatch):
    """Only a pack whose own copies are gone has no tokenizer: the error lists every place looked in."""
    bare = tmp_path / "bare"
    shutil.copytree(on_host / "text_encoders", bare / "text_encoders")
    host.set_models_dir(bare)
    monkeypatch.setattr(models, "PACK_TOKENIZERS", tmp_path / "gone")
    with pytest.raises(BadInput, match=r"no CLIP-L tokenizer found; looked in: .*gone/clip_l"):
        run(loaders.LoadTextEncoders, clip_name=NAMES["clip_name"], t5_name=NAMES["t5_name"], weight_dtype="default")


def test_long_prompt_truncation_is_shown(on_host):
    g = load()
    (_,), ui = run(conditioning.TextEncode, text_encoders=g["text_encoders"], clip_text="cat " * 100, t5_text="",
                   guidance=3.5, max_sequence_length=16)
    text = ui["text"][0]
    assert "CLIP-L" in text and "T5" in text and "cut off" in text


# ------------------------------------------------------------------------------------------ in ComfyUI

def test_inside_comfyui_host_services_and_a_diffusers_folder(comfy_stubs, tiny_models, tmp_path):
    """With the ComfyUI stubs: text encoders and tokenizers from a diffusers pipeline folder, the model
    manager loads the model before use (deciding itself how much of it), progress goes to ComfyUI's bar, and
    an interrupt stops sampling."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    models.clear_cache()
    cs = comfy_stubs
    for sub, name in (("diffusion_models", NAMES["model_name"]), ("vae", NAMES["vae_name"]),
                      ("loras", NAMES["lora_name"])):
        shutil.copy(tiny_models / sub / name, cs.models / sub / name)
    parts = dict(text_encoder=factory.tiny_clip_l(hidden_size=32, seed=5),
                 text_encoder_2=factory.tiny_t5(d_model=32, seed=6),
                 tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZERS / "clip_l")),
                 tokenizer_2=T5TokenizerFast.from_pretrained(str(TOKENIZERS / "t5xxl")))
    pipe = cs.models / "text_encoders" / "FLUX.1-tiny"
    for name, part in parts.items():
        part.save_pretrained(str(pipe / name))
    (pipe / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')

    (tr,), _ = run(loaders.LoadTransformer, model_name=NAMES["model_name"], weight_dtype="default", quantize="none")
    assert isinstance(tr.handle, sys.modules["comfy.model_patcher"].ModelPatcher)
    plain = tr
    (te,), te_ui = run(loaders.LoadTextEncoders, clip_name="FLUX.1-tiny", t5_name="FLUX.1-tiny",
                       weight_dtype="default")
    assert all("diffusers folder" in c["tokenizer"] for c in te_ui["fluxbridge"][0]["components"])
    assert [c["family"] for c in te_ui["fluxbridge"][0]["components"]] == ["clip-l", "t5-xxl"]
    (tr, te), _ = run(loaders.LoadLoRA, transformer=tr, lora_name=NAMES["lora_name"], strength_model=1.0,
                      strength_text=1.0, text_encoders=te)
    (cond,), _ = run(conditioning.TextEncode, text_encoders=te, clip_text=PROMPT, t5_text="", guidance=3.5,
                     max_sequence_length=64)
    (empty,), _ = run(latent.EmptyLatent, width=SIZE, height=SIZE, batch_size=1)

    seen = []
    cs.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    cs.mm._calls.clear()
    base = snapshot(tr.module)
    (lat,), _ = run(sampling.Sampler, transformer=tr, positive=cond, latent=empty, seed=SEED, steps=2)
    loads = [c for c in cs.mm._calls if c[0] == "load_models_gpu"]
    assert loads and loads[-1][1][0] == [tr.handle] and loads[-1][2]["force_full_load"] is False
    assert seen[-1] == (2, 2)

    cs.mm.interrupt_current_processing(True)
    with pytest.raises(cs.mm.InterruptProcessingException):
        run(sampling.Sampler, transformer=tr, positive=cond, latent=empty, seed=SEED, steps=2)
    with plain.patched() as module:  # the base, without the stack, is as loaded
        assert_same_state(module, base)
    (again,), _ = run(sampling.Sampler, transformer=tr, positive=cond, latent=empty, seed=SEED, steps=2)
    assert torch.equal(again["samples"], lat["samples"])
    models.clear_cache()  # the handles are the stubs' ModelPatchers: do not hand them to later tests


def test_inside_comfyui_the_bundled_tokenizers_come_before_the_packs(comfy_stubs, tiny_models, tmp_path, monkeypatch):
    """Inside ComfyUI, CLIP-L / T5 files in text_encoders/ get ComfyUI's bundled tokenizers (`comfy/
    sd1_tokenizer`, `comfy/text_encoders/t5_tokenizer`); where one is missing, the pack's own copy."""
    cs = comfy_stubs
    comfy_dir = tmp_path / "ComfyUI" / "comfy"  # the stubs pretend to live in a real ComfyUI layout
    monkeypatch.setattr(cs.mm, "__file__", str(comfy_dir / "model_management.py"))
    shutil.copytree(TOKENIZERS / "clip_l", comfy_dir / "sd1_tokenizer")
    for name in (NAMES["clip_name"], NAMES["t5_name"]):
        shutil.copy(tiny_models / "text_encoders" / name, cs.models / "text_encoders" / name)
    try:
        (te,), ui = run(loaders.LoadTextEncoders, clip_name=NAMES["clip_name"], t5_name=NAMES["t5_name"],
                        weight_dtype="default")
    finally:
        models.clear_cache()  # the handles are the stubs' ModelPatchers: do not hand them to later tests
    assert [c["tokenizer"] for c in ui["fluxbridge"][0]["components"]] == [
        f"ComfyUI's bundled copy ({comfy_dir / 'sd1_tokenizer'})", f"the pack's own copy ({TOKENIZERS / 't5xxl'})"]
    assert (te.tokenizers.clip(PROMPT).input_ids, te.tokenizers.t5(PROMPT).input_ids) == CAT_IDS


def test_lora_report_names_each_unusable_key_once(on_host):
    """A LoRA with transformer and CLIP-L parts and one key that fits nothing, on a transformer and connected
    text encoders: the report lists that key once (it belongs to the file, not to each model it was
    planned on)."""
    from safetensors.torch import load_file
    g = load()
    lora = load_file(str(on_host / "loras" / NAMES["lora_name"]))
    gen = torch.Generator().manual_seed(11)
    lora["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(4, 32, generator=gen)
    lora["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(32, 4, generator=gen)
    lora["lora_unet_no_such_module.lora_down.weight"] = torch.randn(4, 32, generator=gen)
    lora["lora_unet_no_such_module.lora_up.weight"] = torch.randn(32, 4, generator=gen)
    save_file(lora, str(on_host / "loras" / "with_text.safetensors"))
    try:
        (tr, te), ui = run(loaders.LoadLoRA, transformer=g["transformer"], lora_name="with_text.safetensors",
                           strength_model=1.0, strength_text=1.0, text_encoders=g["text_encoders"])
    finally:
        (on_host / "loras" / "with_text.safetensors").unlink()
    report = ui["fluxbridge"][0]
    assert any(m.startswith("clip-l: ") for m in report["patched"])  # the text part was planned too
    keys = [n["key"] for n in report["not_placed"]]
    assert any("no_such_module" in k for k in keys)
    assert len(keys) == len(set(keys)), keys
    assert f"not placed {len(keys)}" in ui["text"][0]
