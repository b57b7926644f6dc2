"""Models that do not fit the GPU: ComfyUI's partial loading (through the stubs), standalone group offloading.

What is proven on the CPU:
* inside ComfyUI every Linear / Conv / GroupNorm / LayerNorm / RMSNorm / Embedding of the transformer, VAE,
  CLIP-L and T5 becomes ComfyUI's own `comfy.ops` layer, and the outputs are bitwise the plain models' both
  as loaded and with every layer left on the offload device (each of those layers then takes its weights
  through ComfyUI's cast); what cannot be cast (T5's RMSNorm) is listed and kept on the compute device;
* through the stubs' model manager, a graph whose models do not fit the reported free memory runs with
  layers left behind (the stubs' ModelPatcher records them) and gives the standalone image bit for bit,
  with --novram too; a LoRA on such a model changes the image exactly as on a fully loaded one and is
  removed bitwise, also when ComfyUI moves layers while it is applied;
* standalone: the group-offloading decision, and diffusers' group offloading on the CPU (no stream) with
  bitwise outputs, LoRA apply (re-read by the offloading) and bitwise removal.
"""
import dataclasses
import shutil
import sys

import pytest
import torch

from fluxbridge.convert.lora.apply import apply_loras
from fluxbridge.headless import demo, factory
from fluxbridge.nodes import conditioning, latent, loaders, sampling
from fluxbridge.pipeline.device import execution_device
from fluxbridge.runtime import models, offload
from model_state import assert_same_state, snapshot  # tests/helpers
from node_graph import run  # tests/helpers

SIZE, STEPS, SEED, PROMPT = 32, 2, 3, "a red fox in the snow"
NAMES = dict(model_name="flux1-dev.safetensors", clip_name="clip_l.safetensors", t5_name="t5xxl_fp16.safetensors",
             vae_name="ae.safetensors", lora_name="flux_lora_style.safetensors")
CASTABLE = ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "RMSNorm", "Embedding")


# --------------------------------------------------------------------------------------------- helpers

def tiny_models():
    return {"transformer": factory.tiny_flux_transformer(), "vae": factory.tiny_flux_vae(),
            "clip": factory.tiny_clip_l(), "t5": factory.tiny_t5()}


@torch.no_grad()
def forward(kind, module):
    g = torch.Generator().manual_seed(0)
    if kind == "transformer":
        c = module.config
        return module(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                      encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                      pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                      timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                      guidance=torch.tensor([3.5]), return_dict=False)[0]
    if kind == "vae":
        return module.decode(torch.randn(1, 16, 4, 4, generator=g)).sample
    out = module(torch.randint(0, 50, (1, 12), generator=g))
    return out.pooler_output if kind == "clip" else out[0]


def leaves_with_weights(module):
    return [m for m in module.modules() if list(m.parameters(recurse=False))]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The demo's models (dev transformer, VAE, CLIP-L, T5, two LoRAs) in a models folder."""
    root = tmp_path_factory.mktemp("lowvram-models")
    demo.build_models(root, loras=True)
    return root


def graph(lora=None):
    """Loaders (+ LoRA) -> text encode -> empty latent -> sampler -> decode, through the node classes."""
    (tr,), _ = run(loaders.LoadTransformer, model_name=NAMES["model_name"], weight_dtype="default", quantize="none")
    (te,), _ = run(loaders.LoadTextEncoders, clip_name=NAMES["clip_name"], t5_name=NAMES["t5_name"],
                   weight_dtype="default")
    (vae,), _ = run(loaders.LoadVAE, vae_name=NAMES["vae_name"])
    if lora is not None:
        (tr, te), _ = run(loaders.LoadLoRA, transformer=tr, lora_name=NAMES["lora_name"], strength_model=lora,
                          strength_text=1.0, text_encoders=te)
    (cond,), _ = run(conditioning.TextEncode, text_encoders=te, clip_text=PROMPT, t5_text="", guidance=3.5,
                     max_sequence_length=32)
    (empty,), _ = run(latent.EmptyLatent, width=SIZE, height=SIZE, batch_size=1)
    (lat,), _ = run(sampling.Sampler, transformer=tr, positive=cond, latent=empty, seed=SEED, steps=STEPS)
    (image,), _ = run(latent.VAEDecode, vae=vae, latent=lat, tiled="auto")
    return dict(transformer=tr, text_encoders=te, vae=vae, conditioning=cond, latent=lat, image=image)


@pytest.fixture
def models_dir(demo_dir):
    return demo_dir


@pytest.fixture(scope="module")
def standalone_images(demo_dir):
    """The graph's images on the standalone host (plain torch layers, whole models): the references."""
    from fluxbridge.runtime import host
    assert not host.detect_host()
    saved = host.models_dir()
    host.set_models_dir(demo_dir)
    try:
        models.clear_cache()
        plain = graph()
        assert not any(hasattr(m, "comfy_cast_weights") for m in plain["transformer"].module.modules())
        images = {None: plain["image"], 1.0: graph(lora=1.0)["image"]}
    finally:
        host.set_models_dir(saved)
        models.clear_cache()
    assert not torch.equal(images[None], images[1.0])  # the LoRA does something
    return images


@pytest.fixture
def in_comfy(comfy_stubs, demo_dir, monkeypatch):
    """The stubs with the demo models in ComfyUI's folders (the stubs bundle no tokenizers: the pack's own are
    used), and the CPU counted as a GPU so the model manager may load partly (ComfyUI never does on the CPU)."""
    cs = comfy_stubs
    for part in ("dev", "vae", "clip", "t5"):
        src = demo_dir / demo.MODEL_FILES[part]
        shutil.copy(src, cs.models / src.parent.name / src.name)
    shutil.copy(demo_dir / demo.LORA_FILES[0], cs.models / "loras" / NAMES["lora_name"])
    monkeypatch.setattr(cs.mm, "_cpu_counts_as_gpu", True)
    monkeypatch.setattr(cs.mm, "_LOWVRAM_FLOOR", 0)  # the models are tiny: let a budget of a few KB stand
    monkeypatch.setattr(cs.mm, "EXTRA_RESERVED_VRAM", 0)
    monkeypatch.setattr(cs.mm, "minimum_inference_memory", lambda: 0)
    models.clear_cache()
    yield cs
    models.clear_cache()  # the handles are the stubs' ModelPatchers: do not hand them to later tests


def patchers(g):
    te = g["text_encoders"]
    return {"transformer": g["transformer"].handle, "clip": te.clip.handle, "t5": te.t5.handle,
            "vae": g["vae"].handle}


# ------------------------------------------------------------------------------------- castable layers

def test_inside_comfyui_layers_are_comfys_own_and_compute_bitwise_the_same(comfy_stubs, monkeypatch):
    host = comfy_stubs.host
    ops = sys.modules["comfy.ops"]
    for kind, module in tiny_models().items():
        reference = forward(kind, module)
        assert host.make_castable(module) is module
        kept = [type(m).__name__ for m in leaves_with_weights(module) if not isinstance(m, ops.CastWeightBiasOp)]
        assert kept == (["T5LayerNorm"] * 5 if kind == "t5" else []), kind  # only T5's own RMSNorm
        for m in module.modules():
            if isinstance(m, ops.CastWeightBiasOp):
                name = type(m).__name__
                assert name in CASTABLE and type(m) is getattr(ops.disable_weight_init, name)
                assert isinstance(m, getattr(torch.nn, name))
        assert torch.equal(forward(kind, module), reference), kind  # as loaded: torch's own forward

        # every layer left on the offload device, as ComfyUI leaves them under --novram
        ran, cast = set(), set()
        hooks = [m.register_forward_pre_hook(lambda m, a: ran.add(m)) for m in leaves_with_weights(module)]
        real_cast = ops.cast_bias_weight
        monkeypatch.setattr(ops, "cast_bias_weight", lambda s, *a, **k: cast.add(s) or real_cast(s, *a, **k))
        for m in module.modules():
            if isinstance(m, ops.CastWeightBiasOp):
                m.comfy_cast_weights = True
        assert torch.equal(forward(kind, module), reference), kind
        for h in hooks:
            h.remove()
        monkeypatch.undo()
        castable_ran = {m for m in ran if isinstance(m, ops.CastWeightBiasOp)}
        assert castable_ran and castable_ran == cast, kind  # each of them took its weights through the cast


def test_standalone_layers_stay_plain_torch(standalone_host):
    module = factory.tiny_t5()
    types = [type(m) for m in module.modules()]
    assert standalone_host.make_castable(module) is module
    assert [type(m) for m in module.modules()] == types
    handle = standalone_host.wrap(module, "text_encoder")
    assert isinstance(handle, standalone_host.Handle) and execution_device(module) == handle.load_device


def test_fp8_storage_goes_through_the_cast_too(in_comfy, monkeypatch):
    """fp8 storage wraps the layers' forward (`convert.upcast`), calling the layer's class forward: the layers
    stay castable, so a layer left behind still takes its weights through ComfyUI's cast, and computes the
    same."""
    ops = sys.modules["comfy.ops"]
    tr, _ = models.load_transformer(in_comfy.models / "diffusion_models" / NAMES["model_name"],
                                    weight_dtype="fp8_e4m3fn")
    assert any(p.dtype == torch.float8_e4m3fn for p in tr.module.parameters())
    reference = forward("transformer", tr.module)
    cast = []
    real_cast = ops.cast_bias_weight
    monkeypatch.setattr(ops, "cast_bias_weight", lambda s, *a, **k: cast.append(s) or real_cast(s, *a, **k))
    tr.handle.load(torch.device("cpu"), lowvram_model_memory=0.1)
    assert tr.handle._left_behind and cast == []
    assert torch.equal(forward("transformer", tr.module), reference)
    assert len({id(s) for s in cast}) >= len([m for m in tr.module.modules() if isinstance(m, torch.nn.Linear)])


def test_roles_follow_comfyuis_device_rules(comfy_stubs, monkeypatch):
    host, mm = comfy_stubs.host, comfy_stubs.mm
    monkeypatch.setattr(mm, "text_encoder_device", lambda: torch.device("meta"))  # e.g. a GPU under normal VRAM
    monkeypatch.setattr(mm, "vae_offload_device", lambda: torch.device("meta"))
    t5 = factory.tiny_t5()
    handle = host.wrap(t5, "text_encoder")
    assert handle.load_device == torch.device("meta") and handle.offload_device == mm.text_encoder_offload_device()
    assert execution_device(t5) == torch.device("meta")  # the pipeline puts its inputs where it computes
    vae = host.wrap(factory.tiny_flux_vae(), "vae")
    assert vae.load_device == mm.vae_device() and vae.offload_device == torch.device("meta")
    with pytest.raises(ValueError, match="role"):
        host.devices("unet")


def test_what_cannot_be_cast_is_kept_on_the_compute_device(comfy_stubs):
    """After ComfyUI loads a model (partly), the host's callback moves the parts without the cast protocol
    (T5's RMSNorm scales, CLIP's position ids) to the compute device; the castable layers stay ComfyUI's."""
    host = comfy_stubs.host
    on_load = sys.modules["comfy.patcher_extension"].CallbacksMP.ON_LOAD
    for module, kept in ((factory.tiny_t5(), "T5LayerNorm"), (factory.tiny_clip_l(), "CLIPTextEmbeddings")):
        handle = host.wrap(module, "text_encoder")
        assert host._keep_on_device in handle.callbacks[on_load][None]
        handle.load(torch.device("cpu"), lowvram_model_memory=0.1)  # everything behind: on the CPU here
        host._keep_on_device(handle, torch.device("meta"))  # as if ComfyUI had loaded it to another device
        for m in module.modules():
            tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
            if tensors:
                where = {t.device.type for t in tensors}
                assert where == ({"meta"} if type(m).__name__ == kept else {"cpu"}), type(m).__name__


# ------------------------------------------------------------------------------ partial loading, graph

def test_models_that_do_not_fit_are_partly_loaded_and_the_image_is_unchanged(in_comfy, standalone_images,
                                                                            monkeypatch):
    mm = in_comfy.mm
    sizes = {}
    real_load = mm.load_models_gpu

    def reported(models_, **kw):  # free: the room the work asks for, and half of each model's size
        monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: sizes["free"])
        for p in models_:
            sizes["free"] = p.model_size() // 2 + kw["memory_required"]
            real_load([p], **kw)

    monkeypatch.setattr(mm, "load_models_gpu", reported)
    g = graph()
    assert torch.equal(g["image"], standalone_images[None])
    for name, p in patchers(g).items():
        units = p._units()
        behind = set(p._left_behind)
        assert 0 < len(behind) < len(units), name  # partly: some layers loaded, some stayed behind
        for _, unit, m in units:
            if hasattr(m, "comfy_cast_weights"):
                assert m.comfy_cast_weights == (unit in behind), (name, unit)
        assert p.model.model_lowvram and 0 < p.loaded_size() < p.model_size(), name


def test_novram_leaves_every_castable_layer_behind(in_comfy, standalone_images, monkeypatch):
    mm = in_comfy.mm
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    mm._calls.clear()
    g = graph()
    assert torch.equal(g["image"], standalone_images[None])
    loads = [kw for name, _, kw in mm._calls if name == "load_models_gpu"]
    assert loads and all(kw["force_full_load"] is False for kw in loads)
    assert any(kw["memory_required"] > 0 for kw in loads)  # the sampler and the decode say what they need
    for name, p in patchers(g).items():
        castable = {unit for size, unit, m in p._units() if hasattr(m, "comfy_cast_weights") and size}
        assert castable and castable <= set(p._left_behind), name  # (weightless LayerNorms count as loaded)
        assert p.loaded_size() < p.model_size() * 0.01, name  # only what cannot be cast: T5's RMSNorm scales


def test_highvram_loads_whole(in_comfy, standalone_images, monkeypatch):
    mm = in_comfy.mm
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.HIGH_VRAM)
    g = graph()
    assert torch.equal(g["image"], standalone_images[None])
    for name, p in patchers(g).items():
        assert p._left_behind == [] and not p.model.model_lowvram and p.loaded_size() == p.model_size(), name


# ------------------------------------------------------------------------------------- LoRA, partly

def test_lora_on_a_partly_loaded_model_is_applied_and_removed_bitwise(in_comfy, standalone_images, monkeypatch):
    mm = in_comfy.mm
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    g = graph(lora=1.0)
    assert torch.equal(g["image"], standalone_images[1.0])  # the LoRA did exactly what it does on a whole model

    tr = g["transformer"]
    plain = dataclasses.replace(tr, loras=())
    p = tr.handle
    with plain.patched():  # the graph's run left its stack on: the base, without it
        base = snapshot(tr.module)
    flags = {unit: m.comfy_cast_weights for _, unit, m in p._units() if hasattr(m, "comfy_cast_weights")}
    bookkeeping = (list(p._left_behind), p.loaded_size(), p.model.model_lowvram)
    with tr.patched() as module:
        assert any(not torch.equal(v, base[k]) for k, v in module.state_dict().items())
    with plain.patched():
        assert_same_state(tr.module, base)
    assert {unit: m.comfy_cast_weights for _, unit, m in p._units() if hasattr(m, "comfy_cast_weights")} == flags
    assert (list(p._left_behind), p.loaded_size(), p.model.model_lowvram) == bookkeeping


def test_lora_survives_comfyui_moving_layers_while_it_is_applied(in_comfy, monkeypatch):
    """Half the transformer loaded; the LoRA applied; ComfyUI then unloads more layers (another model needs
    the room): the sampling result equals a LoRA run on the whole model, and removal is bitwise."""
    from fluxbridge.pipeline.sample import sample
    mm = in_comfy.mm
    g = graph(lora=1.0)  # everything fits the reported free memory here: the reference
    tr, cond = g["transformer"], g["conditioning"]
    empty, sigmas = {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}, torch.tensor([1.0, 0.5, 0.0])
    assert tr.handle._left_behind == []
    with tr.patched() as module:
        reference = sample(module, cond, empty, sigmas, seed=SEED)["samples"]
    plain = dataclasses.replace(tr, loras=())
    with plain.patched():
        base = snapshot(tr.module)

    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: tr.handle.model_size() // 2)
    tr.handle.detach()
    mm.load_models_gpu([tr.handle])
    assert tr.handle._left_behind
    with tr.patched() as module:
        behind = len(tr.handle._left_behind)
        freed = tr.handle.partially_unload(torch.device("cpu"), memory_to_free=tr.handle.loaded_size() // 2)
        assert freed > 0 and len(tr.handle._left_behind) > behind
        moved = sample(module, cond, empty, sigmas, seed=SEED)["samples"]
    assert torch.equal(moved, reference)
    with plain.patched():  # removed after ComfyUI moved layers: each original where its parameter is now
        assert_same_state(tr.module, base)


def test_lora_removal_follows_the_parameter_to_its_current_device():
    """ComfyUI may move a layer while a LoRA is applied (on a GPU `.to()` keeps the parameter object and swaps
    its data): the original goes back to the device the parameter is on by then, not where it was."""
    from fluxbridge.convert.lora.apply import LoraHandle, _Kept
    original = torch.arange(6.0)
    param = torch.nn.Parameter(torch.empty(6, device="meta"), requires_grad=False)  # moved since the apply
    handle = LoraHandle(torch.nn.Module(), "flux-transformer", [])
    handle._originals.append(("w", param, _Kept(original)))
    handle.remove()
    assert param.device.type == "meta" and param.shape == original.shape
    kept = torch.nn.Parameter(torch.zeros(6), requires_grad=False)  # not moved: the very original object back
    handle._originals.append(("w", kept, _Kept(original)))
    handle.remove()
    assert kept.data.data_ptr() == original.data_ptr()


# --------------------------------------------------------------------------- standalone group offloading

def test_group_offload_decision():
    gib = 1 << 30
    assert not offload.should_offload("cpu", 100 * gib, 0, headroom=gib)  # nowhere to offload to
    assert not offload.should_offload("mps", 100 * gib, 0, headroom=gib, forced=True)  # unified memory
    assert not offload.should_offload("cuda:0", 10 * gib, 12 * gib, headroom=gib)  # fits with the headroom
    assert offload.should_offload("cuda:0", 10 * gib, 10 * gib, headroom=gib)  # the weights fit, not the work
    assert offload.should_offload("cuda", 24 * gib, 16 * gib, headroom=gib)
    assert offload.should_offload("cuda:0", gib, 80 * gib, headroom=gib, forced=True)  # --lowvram


def test_standalone_free_memory_respects_the_process_share(standalone_host, monkeypatch):
    gib = 1 << 30
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib), raising=False)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 3 * gib, raising=False)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 4 * gib, raising=False)
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    assert standalone_host._free_memory("cuda:0") == 71 * gib  # free + cached but unused
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 0.15, raising=False)
    assert standalone_host._free_memory("cuda:0") == int(0.15 * 80 * gib) - 3 * gib  # a 12 GiB cap
    assert standalone_host._free_memory("cpu") == 0


def test_standalone_load_offloads_what_does_not_fit(standalone_host, monkeypatch):
    host = standalone_host
    enabled = []
    monkeypatch.setattr(offload, "enable", lambda module, onload, off: enabled.append((module, onload, off)))
    big, small = factory.tiny_clip_l(), factory.tiny_flux_transformer()
    monkeypatch.setattr(host, "_free_memory", lambda device: offload.model_bytes(small) + host.HEADROOM)
    moves = []
    for m in (big, small):
        monkeypatch.setattr(m, "to", lambda device, m=m: moves.append((m, str(device))) or m)
    hb, hs = host.Handle(big, "cuda:0", "cpu"), host.Handle(small, "cuda:0", "cpu")
    host.load_to_device([hs, hb])
    assert enabled == [(big, "cuda:0", "cpu")] and hb.group_offloaded and not hs.group_offloaded
    assert moves == [(small, "cuda:0")]  # the one that fits goes whole; the other is not moved
    host.load_to_device([hb])  # once offloaded, it brings its blocks in itself: not moved, not set up again
    assert len(enabled) == 1 and moves == [(small, "cuda:0"), (small, "cpu")]

    previous = host.set_lowvram(True)  # --lowvram: even what fits
    try:
        other = host.Handle(factory.tiny_flux_vae(), "cuda:0", "cpu")
        host.load_to_device([other])
        assert other.group_offloaded and enabled[-1][0] is other.model
    finally:
        host.set_lowvram(previous)
    cpu = host.Handle(factory.tiny_flux_vae(), "cpu", "cpu")
    host.set_lowvram(True)
    try:
        host.load_to_device([cpu])
    finally:
        host.set_lowvram(previous)
    assert not cpu.group_offloaded  # on the CPU there is nothing to offload to


@pytest.mark.parametrize("kind", ["transformer", "t5", "clip"])
def test_group_offloading_on_the_cpu_is_bitwise(kind):
    module = tiny_models()[kind]
    reference = forward(kind, module)
    offload.enable(module, "cpu", "cpu")
    assert offload.is_offloaded(module)
    assert torch.equal(forward(kind, module), reference)
    offload.disable(module)
    assert not offload.is_offloaded(module) and all(p.device.type == "cpu" for p in module.parameters())
    assert torch.equal(forward(kind, module), reference)


def test_lora_on_a_group_offloaded_model(standalone_host, monkeypatch, tmp_path):
    """The LoRA is applied and removed through the model object, as the nodes do; the offloading re-reads the
    weights after each change (`host.weights_changed`)."""
    from fluxbridge.headless.demo import tiny_lora
    from fluxbridge.convert.lora.formats import load_lora
    from safetensors.torch import save_file
    refreshed = []
    real_refresh = offload.refresh
    monkeypatch.setattr(offload, "refresh", lambda m: refreshed.append(m) or real_refresh(m))
    plain, managed = factory.tiny_flux_transformer(), factory.tiny_flux_transformer()
    path = str(tmp_path / "l.safetensors")
    save_file({k: v * 20 for k, v in tiny_lora(plain, "peft", seed=2).items()}, path)
    lora = load_lora(path)
    with apply_loras(plain, "flux-transformer", [(lora, 1.0)]):
        with_lora = forward("transformer", plain)
    reference = forward("transformer", plain)

    offload.enable(managed, "cpu", "cpu")
    model = models.TransformerModel(module=managed, handle=standalone_host.wrap(managed), name="t", path=path,
                                    family="flux-transformer", layout="diffusers", variant="dev", config={},
                                    dtype="float32", storage="float32", report={})
    model = model.with_lora("l", lora, 1.0)
    base = snapshot(managed)
    with model.patched() as module:
        assert torch.equal(forward("transformer", module), with_lora)
    assert refreshed == [managed] and offload.is_offloaded(managed)
    with dataclasses.replace(model, loras=()).patched():  # a use without the stack removes it
        assert refreshed == [managed, managed] and offload.is_offloaded(managed)
        assert_same_state(managed, base)
        assert torch.equal(forward("transformer", managed), reference)
