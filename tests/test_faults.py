"""Fault injection, stage by stage: a failure anywhere leaves nothing half done behind.

* loading: an exception while the tensors are assigned leaves no half-loaded model in the cache, and the
  next load works and equals a fresh one bitwise;
* LoRA patching (the node path: `TransformerModel.patched()` / `TextEncoders.patched()` in models.py): a
  failure half-way leaves every weight bitwise unchanged and no hook behind, and patching works afterwards;
* sampling: an exception raised inside the transformer at step k, and an interrupt through the host (the
  standalone flag and ComfyUI's, with the stubs), leave the cached transformer usable: its base (seen by a
  use without the stack) is bitwise unchanged, and the next run equals a fresh run bitwise;
* decoding: running out of memory on the whole image falls back to tiles (and equals a tiled decode);
* writing: an exception (or Ctrl-C) mid-write leaves no file under the final name, no `.partial`, no half
  diffusers folder, no half PNG.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxbridge.headless import demo, factory, native_nodes
from fluxbridge.runtime import host, models
from fluxbridge.convert import origins as origins_mod
from fluxbridge.convert import safetensors_io
from fluxbridge.convert.load import load_model
from fluxbridge.convert.lora import apply as apply_mod
from fluxbridge.convert.lora import load_lora
from fluxbridge.convert.lora.write import convert_lora
from fluxbridge.convert.write import convert_file
from fluxbridge.nodes import conditioning, convert, latent, loaders, sampling
from fluxbridge.pipeline import vae as vae_lib
from model_state import assert_same_state, snapshot  # tests/helpers

MODEL, VAE, CLIP, T5 = "flux1-dev.safetensors", "ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"
LORA, TEXT_LORA = "flux_lora_style.safetensors", "text_lora.safetensors"
SMALL_VAE = "small-ae.safetensors"
SIZE, STEPS, SEED = 32, 3, 11


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The demo's tiny models (dev transformer, VAE, CLIP-L, T5, two LoRAs) plus a LoRA with
    CLIP-L and T5 parts only."""
    root = demo.demo_models(tmp_path_factory.mktemp("faults-cache"), variants=("dev",), loras=True)
    root = Path(shutil.copytree(root, tmp_path_factory.mktemp("faults") / "models"))
    g = torch.Generator().manual_seed(3)
    text = {}
    for stem in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",  # CLIP-L
                 "lora_te2_encoder_block_0_layer_0_SelfAttention_q"):  # T5
        text[stem + ".lora_down.weight"] = torch.randn(2, 32, generator=g)
        text[stem + ".lora_up.weight"] = torch.randn(32, 2, generator=g)
        text[stem + ".alpha"] = torch.tensor(2.0)
    save_file(text, str(root / "loras" / TEXT_LORA))
    # a VAE with a 2x downscale: latents larger than one 64-pixel tile decode quickly
    factory.save_layout(factory.tiny_flux_vae(block_out_channels=(8, 16), seed=7), root / "vae" / SMALL_VAE, "bfl")
    return root


@pytest.fixture
def models_dir(model_dir):
    """The standalone host fixture (conftest `standalone_host`) points at this module's models."""
    return model_dir


@pytest.fixture
def fault():
    """A monkeypatch of its own for the injected faults: undoing it leaves the host fixture alone."""
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def files_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def transformer(lora_strength=None):
    tr = loaders.LoadTransformer.execute(model_name=MODEL, weight_dtype="default", quantize="none").args[0]
    if lora_strength is not None:
        tr = loaders.LoadLoRA.execute(transformer=tr, lora_name=LORA, strength_model=lora_strength,
                                      strength_text=1.0).args[0]
    return tr


def text_encoders():
    return loaders.LoadTextEncoders.execute(clip_name=CLIP, t5_name=T5, weight_dtype="default").args[0]


def inputs():
    (cond,) = conditioning.TextEncode.execute(text_encoders=text_encoders(), clip_text="a fox in the snow",
                                              t5_text="", guidance=3.5, max_sequence_length=32).args
    (empty,) = latent.EmptyLatent.execute(width=SIZE, height=SIZE, batch_size=1).args
    return cond, empty


def sample(tr, cond, empty):
    return sampling.Sampler.execute(transformer=tr, positive=cond, latent=empty, seed=SEED, steps=STEPS).args[0]


class Flaky:
    """Calls `real` and raises `exc` on call number `at` (counting every function it wraps)."""

    def __init__(self, at: int, exc: BaseException = RuntimeError("injected fault")):
        self.at, self.exc, self.calls = at, exc, 0

    def wrap(self, real):
        def flaky(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise self.exc
            return real(*args, **kwargs)
        return flaky


# -------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("where", ["reading the 7th tensor", "assigning the tensors"])
def test_failure_while_loading_caches_nothing_and_the_next_load_works(on_host, fault, where):
    models.clear_cache()
    flaky = Flaky(at=7 if where.startswith("reading") else 1)
    if where.startswith("reading"):
        fault.setattr(origins_mod, "materialize", flaky.wrap(origins_mod.materialize))  # what the loader reads through
    else:
        fault.setattr(torch.nn.Module, "load_state_dict", flaky.wrap(torch.nn.Module.load_state_dict))
    with pytest.raises(RuntimeError, match="injected fault"):
        transformer()
    assert flaky.calls == flaky.at
    assert models.cache_keys("transformer") == []  # no half-loaded model kept
    fault.undo()
    tr = transformer()
    assert [k[0] for k in models.cache_keys()] == ["transformer"]
    fresh = load_model(on_host / "diffusion_models" / MODEL, family="flux-transformer", dtype=torch.float32).model
    assert_same_state(tr.module, snapshot(fresh))
    assert not any(p.is_meta for p in tr.module.parameters())


def test_bad_file_mid_load_caches_nothing(on_host, tmp_path):
    """The same for a file that fails its checks after the model was built (a tensor missing)."""
    models.clear_cache()
    src = on_host / "diffusion_models" / MODEL
    state = load_file(str(src))
    state.pop(sorted(state)[-1])
    save_file(state, str(on_host / "diffusion_models" / "broken.safetensors"))
    try:
        with pytest.raises(Exception, match="missing"):
            loaders.LoadTransformer.execute(model_name="broken.safetensors")
        assert models.cache_keys("transformer") == []
        assert transformer().family == "flux-transformer"
    finally:
        (on_host / "diffusion_models" / "broken.safetensors").unlink()


# --------------------------------------------------------------------------------------- LoRA patching

def test_transformer_lora_failing_half_way_leaves_the_model_unchanged(on_host, fault):
    tr = transformer(lora_strength=1.0)
    base, hooks_before = snapshot(tr.module), hooks(tr.module)
    flaky = Flaky(at=4)  # three tensors are already swapped in when the fourth fails
    fault.setattr(apply_mod, "_assign", flaky.wrap(apply_mod._assign))
    with pytest.raises(RuntimeError, match="injected fault"):
        with tr.patched():
            pytest.fail("the body must not run")
    assert flaky.calls == 4
    assert_same_state(tr.module, base)
    assert hooks(tr.module) == hooks_before
    fault.undo()
    with tr.patched() as module:  # and it still patches afterwards, and comes off bitwise
        assert any(not torch.equal(v, base[k]) for k, v in module.state_dict().items())
    with dataclasses.replace(tr, loras=()).patched() as module:
        assert_same_state(module, base)


def test_text_encoder_lora_failing_in_t5_unwinds_clip_too(on_host, fault):
    te = text_encoders()
    assert load_lora(on_host / "loras" / TEXT_LORA).family_parts("t5-xxl")
    tr = transformer()
    _, te = loaders.LoadLoRA.execute(transformer=tr, lora_name=TEXT_LORA, strength_model=1.0, strength_text=1.0,
                                     text_encoders=te).args
    clip, t5 = snapshot(te.clip.module), snapshot(te.t5.module)
    flaky = Flaky(at=2)  # CLIP-L's one tensor is in; T5's fails
    fault.setattr(apply_mod, "_assign", flaky.wrap(apply_mod._assign))
    with pytest.raises(RuntimeError, match="injected fault"):
        conditioning.TextEncode.execute(text_encoders=te, clip_text="a cat", max_sequence_length=16)
    assert flaky.calls == 2
    assert_same_state(te.clip.module, clip)
    assert_same_state(te.t5.module, t5)
    fault.undo()
    (cond,) = conditioning.TextEncode.execute(text_encoders=te, clip_text="a cat", max_sequence_length=16).args
    (plain,) = conditioning.TextEncode.execute(text_encoders=text_encoders(), clip_text="a cat",
                                               max_sequence_length=16).args
    assert not torch.equal(cond[0][0], plain[0][0])  # the LoRA applies...
    assert_same_state(te.clip.module, clip)  # ... and an encode without it sees the bases
    assert_same_state(te.t5.module, t5)


# -------------------------------------------------------------------------------------------- sampling

def _fault_at_call(module, k: int, action):
    """A forward pre-hook on the transformer that runs `action()` on its k-th call (step k)."""
    calls = {"n": 0}

    def hook(mod, args, kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            action()
    return module.register_forward_pre_hook(hook, with_kwargs=True), calls


def _raise():
    raise RuntimeError("injected fault inside the transformer")


@pytest.mark.parametrize("kind", ["exception", "interrupt"])
def test_fault_at_step_k_leaves_the_cached_transformer_unchanged(on_host, kind):
    models.clear_cache()
    cond, empty = inputs()
    fresh = sample(transformer(lora_strength=1.0), cond, empty)
    assert not torch.equal(sample(transformer(), cond, empty)["samples"], fresh["samples"])  # the LoRA matters
    tr = transformer(lora_strength=1.0)
    base, hooks_before, stack = snapshot(tr.module), hooks(tr.module), tr.loras
    action = _raise if kind == "exception" else host.request_interrupt
    handle, calls = _fault_at_call(tr.module, 2, action)
    expected = RuntimeError if kind == "exception" else host.Interrupted
    try:
        with pytest.raises(expected):
            sample(tr, cond, empty)
    finally:
        handle.remove()
    assert calls["n"] == 2
    assert hooks(tr.module) == hooks_before and tr.loras == stack
    with dataclasses.replace(tr, loras=()).patched() as module:  # the base under the stack is as loaded
        assert_same_state(module, base)
    after = sample(tr, cond, empty)
    assert torch.equal(after["samples"], fresh["samples"])
    models.clear_cache()  # and a truly fresh run (everything loaded again) gives the same
    assert torch.equal(sample(transformer(lora_strength=1.0), cond, empty)["samples"], fresh["samples"])


def test_interrupt_at_step_k_inside_comfyui(comfy_stubs, model_dir):
    """Inside ComfyUI (stubs): the host's own interrupt flag, raised at step 2, stops sampling the same way.
    (The stubs have no bundled tokenizer files: the pack's own copies are used.)"""
    models.clear_cache()
    cs = comfy_stubs
    for sub in ("diffusion_models", "loras", "text_encoders"):
        for f in (model_dir / sub).iterdir():
            shutil.copy(f, cs.models / sub / f.name)
    try:
        tr = transformer(lora_strength=1.0)
        cond, empty = inputs()
        fresh = sample(tr, cond, empty)
        base, hooks_before = snapshot(tr.module), hooks(tr.module)
        handle, calls = _fault_at_call(tr.module, 2, lambda: cs.mm.interrupt_current_processing(True))
        try:
            with pytest.raises(cs.mm.InterruptProcessingException):
                sample(tr, cond, empty)
        finally:
            handle.remove()
        assert calls["n"] == 2
        assert_same_state(tr.module, base)
        assert hooks(tr.module) == hooks_before
        assert torch.equal(sample(tr, cond, empty)["samples"], fresh["samples"])
    finally:
        models.clear_cache()  # the handles are the stubs' ModelPatchers: not for later tests


# -------------------------------------------------------------------------------------------- decoding

def test_out_of_memory_while_decoding_falls_back_to_tiles(on_host, fault):
    vae = loaders.LoadVAE.execute(vae_name=SMALL_VAE).args[0]
    g = torch.Generator().manual_seed(5)
    samples = torch.randn(1, 16, 72, 72, generator=g)  # larger than one 64-pixel tile: 2 x 2 tiles
    tiled = vae_lib.decode(vae.module, samples, tiled=True)
    real, full_calls = vae.module.decode, []

    def decode(z, *args, **kwargs):
        if z.shape[-1] == samples.shape[-1]:  # the whole image does not fit; tiles do
            full_calls.append(tuple(z.shape))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(z, *args, **kwargs)

    fault.setattr(vae.module, "decode", decode)
    out = latent.VAEDecode.execute(vae=vae, latent={"samples": samples}, tiled="auto")
    assert full_calls == [(1, 16, 72, 72)]
    assert torch.equal(out.args[0], tiled)
    assert any("ran out of memory" in line for line in out.ui["text"])
    with pytest.raises(torch.OutOfMemoryError):  # tiled="off" means off: the error is not hidden
        latent.VAEDecode.execute(vae=vae, latent={"samples": samples}, tiled="off")

    def broken(z, *args, **kwargs):
        raise RuntimeError("a real bug")
    fault.setattr(vae.module, "decode", broken)
    with pytest.raises(RuntimeError, match="a real bug"):  # only out-of-memory falls back
        latent.VAEDecode.execute(vae=vae, latent={"samples": samples}, tiled="auto")


# --------------------------------------------------------------------------------------------- writing

WRITE_FAULTS = [RuntimeError("injected fault"), KeyboardInterrupt()]


def _flaky_writer(fault, at: int, exc) -> Flaky:
    """Fail the `at`-th tensor written by `write_safetensors`, whether copied from the file or computed."""
    flaky = Flaky(at, exc)
    fault.setattr(safetensors_io, "_write_tensor", flaky.wrap(safetensors_io._write_tensor))
    fault.setattr(safetensors_io, "copy_extents", flaky.wrap(safetensors_io.copy_extents))
    return flaky


@pytest.mark.parametrize("exc", WRITE_FAULTS, ids=["exception", "ctrl-c"])
@pytest.mark.parametrize("to", ["comfy", "diffusers"])
def test_exception_mid_write_leaves_nothing(on_host, tmp_path, fault, to, exc):
    src = on_host / "diffusion_models" / MODEL
    out = tmp_path / "converted"
    out.mkdir()
    dst = out / ("flux.safetensors" if to == "comfy" else "flux-diffusers")
    flaky = _flaky_writer(fault, 3, exc)
    with pytest.raises(type(exc)):
        convert_file(src, dst, to=to)
    assert flaky.calls == 3
    assert files_under(out) == [] and not dst.exists()
    fault.undo()
    convert_file(src, dst, to=to)  # and the same conversion works afterwards
    assert dst.exists()


def test_bundle_failing_in_its_second_component_leaves_no_half_folder(on_host, tmp_path, fault):
    """A ComfyUI all-in-one file (transformer + VAE) to a diffusers folder: the first component's folder is
    complete when the second fails; both are removed."""
    bundle = {}
    for model, name in ((factory.tiny_flux_transformer(width=32, double=1, single=1), "t"),
                        (factory.tiny_flux_vae(), "v")):
        path = factory.save_layout(model, tmp_path / f"{name}.safetensors", "comfy")
        bundle.update(load_file(str(path)))
    save_file(bundle, str(tmp_path / "bundle.safetensors"))
    out = tmp_path / "converted"
    out.mkdir()
    # count the tensors of the first component written, then fail just after it
    real = safetensors_io.write_safetensors
    written = []

    def count(path, entries, metadata=None):
        written.append(Path(path))
        return real(path, entries, metadata)
    fault.setattr("fluxbridge.convert.write.write_safetensors", count)
    convert_file(tmp_path / "bundle.safetensors", out / "ok", to="diffusers")
    assert len(written) == 2 and written[0].parent.name in ("transformer", "vae")
    n_first = len(load_file(str(written[0])))
    shutil.rmtree(out / "ok")
    flaky = _flaky_writer(fault, n_first + 2, RuntimeError("injected fault"))
    with pytest.raises(RuntimeError, match="injected fault"):
        convert_file(tmp_path / "bundle.safetensors", out / "bundle-diffusers", to="diffusers")
    assert flaky.calls == n_first + 2
    assert files_under(out) == [] and list(out.iterdir()) == []


def test_lora_convert_and_save_nodes_fail_cleanly(on_host, tmp_path, fault):
    dst = tmp_path / "lora-kohya.safetensors"
    flaky = _flaky_writer(fault, 2, RuntimeError("injected fault"))
    with pytest.raises(RuntimeError):
        convert_lora(on_host / "loras" / LORA, dst, "diffusers")
    assert not dst.exists() and files_under(tmp_path) == []
    output = Path(host.output_directory())
    tr = transformer(lora_strength=1.0)  # the node bakes the LoRA while it writes
    for call in (lambda: convert.SaveTransformer.execute(transformer=tr, layout="bfl"),
                 lambda: convert.SaveTransformer.execute(transformer=tr, layout="diffusers"),
                 lambda: convert.ConvertLoRA.execute(lora_name=LORA, to="comfy")):
        flaky.calls = 0
        with pytest.raises(RuntimeError, match="injected fault"):
            call()
        assert files_under(output) == [], files_under(output)
    fault.undo()
    convert.SaveTransformer.execute(transformer=tr, layout="bfl")  # the next save works
    assert [Path(f).name for f in files_under(output)] == ["transformer_00001_.safetensors"]


def test_png_failing_mid_save_leaves_no_file(on_host, tmp_path, fault):
    from PIL import Image

    output = Path(host.output_directory())
    ctx = native_nodes.RunContext(output_dir=output)
    images = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    real = Image.Image.save
    calls = {"n": 0}

    def save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second image: some bytes written, then the disk "fills up"
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n partial")
            raise OSError(28, "No space left on device")
        return real(self, fp, *args, **kwargs)
    fault.setattr(Image.Image, "save", save)
    with pytest.raises(OSError, match="No space left"):
        native_nodes.save_image(ctx, images, filename_prefix="faults/img")
    assert files_under(output) == ["faults/img_00001_.png"]  # the first image is whole; no half second one
    with Image.open(output / "faults" / "img_00001_.png") as im:
        assert im.size == (16, 16)
    fault.undo()
    native_nodes.save_image(ctx, images, filename_prefix="faults/img")
    assert files_under(output) == ["faults/img_00001_.png", "faults/img_00002_.png", "faults/img_00003_.png"]
