"""Quantized loading (the `quant` extra: torchao and optimum-quanto).

For every `quantize` choice of FluxBridgeLoadTransformer, the transformer it loads and quantizes gives
exactly (bitwise) the output of the same diffusers model quantized by the library's own API: torchao's
`quantize_` with its weight-only int8 / fp8 configs, optimum-quanto's `quantize` + `freeze` with qint8 /
qfloat8. A LoRA on a quantized transformer changes the output and leaves no trace when it is taken off.
Without the library, the loader says what to install. The library tests skip where the extra is not
installed (`pip install -e ".[test,quant]"`; `.ci/run` installs it).
"""
import copy
import sys

import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.common.errors import BadInput
from fluxbridge.headless import demo, factory
from fluxbridge.runtime import models
from fluxbridge.nodes import loaders

NAME, LORA = "flux1-dev.safetensors", "lora.safetensors"


def _torchao(config):
    def apply(module):
        import torchao.quantization as tq
        tq.quantize_(module, getattr(tq, config)())
    return apply


def _quanto(weights):
    def apply(module):
        import optimum.quanto as oq
        oq.quantize(module, weights=getattr(oq, weights))
        oq.freeze(module)
    return apply


# quantize choice -> (the library's module, what the library itself does to a model)
CHOICES = {"int8": ("torchao", _torchao("Int8WeightOnlyConfig")),
           "fp8": ("torchao", _torchao("Float8WeightOnlyConfig")),
           "quanto-int8": ("optimum.quanto", _quanto("qint8")),
           "quanto-fp8": ("optimum.quanto", _quanto("qfloat8"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The diffusers model (float32) and a models folder holding it in BFL layout, plus a LoRA for it."""
    root = tmp_path_factory.mktemp("quant-models")
    model = factory.tiny_flux_transformer(width=64, heads=2, double=1, single=1, init_std=0.05, seed=3)
    factory.save_layout(model, root / "diffusion_models" / NAME, "bfl")
    (root / "loras").mkdir()
    save_file(demo.tiny_lora(model, "peft", seed=4), str(root / "loras" / LORA))
    return model.eval(), root


@pytest.fixture
def models_dir(reference):
    return reference[1]


def forward(module):
    cfg = module.config
    g = torch.Generator().manual_seed(0)
    tokens, text = 16, 8
    with torch.no_grad():
        return module(hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=g),
                      encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g),
                      pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                      timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                      img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False)[0]


def load(how):
    out = loaders.LoadTransformer.execute(model_name=NAME, weight_dtype="fp32", quantize=how)
    return out.args[0], out.ui


def linears(module):
    return {n: m.weight for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("how", list(CHOICES))
def test_equals_the_library_quantizing_the_same_model(on_host, reference, how):
    library, quantize = CHOICES[how]
    pytest.importorskip(library)
    model, _ = reference
    theirs = copy.deepcopy(model)
    quantize(theirs)
    ours, ui = load(how)
    assert ui["fluxbridge"][0]["dtype"].startswith(f"{how} ({library.replace('.', '-')}, computing in float32")
    mine, their = linears(ours.module), linears(theirs)
    assert mine.keys() == their.keys() and len(mine) > 10
    for name, weight in mine.items():  # every Linear quantized, to the library's own tensor type
        assert type(weight) is type(their[name]) and type(weight) not in (torch.Tensor, torch.nn.Parameter), name
    dense, expected, got = forward(model), forward(theirs), forward(ours.module)
    assert torch.equal(got, expected)
    error = (got - dense).abs().max().item()
    print(f"\n{how}: largest difference to the float32 model {error:.4g} (equal to {library}'s own)")
    assert 0 < error < 0.5 * dense.abs().max().item()


@pytest.mark.parametrize("how", list(CHOICES))
def test_a_lora_on_a_quantized_transformer(on_host, how):
    pytest.importorskip(CHOICES[how][0])
    base, _ = load(how)
    before = forward(base.module)
    with_stack, _ = loaders.LoadLoRA.execute(transformer=base, lora_name=LORA, strength_model=1.0,
                                             strength_text=1.0).args
    with with_stack.patched() as module:
        with_lora = forward(module)
    assert torch.isfinite(with_lora).all() and not torch.equal(with_lora, before)
    with base.patched() as module:  # a use without the stack takes it off without a trace
        assert torch.equal(forward(module), before)
    assert all(type(w) not in (torch.Tensor, torch.nn.Parameter) for w in linears(base.module).values())


@pytest.mark.parametrize("how,package", [("int8", "torchao"), ("fp8", "torchao"), ("quanto-int8", "optimum-quanto"),
                                         ("quanto-fp8", "optimum-quanto")])
def test_without_the_library_the_loader_says_what_to_install(on_host, monkeypatch, how, package):
    for name in ("torchao", "torchao.quantization", "optimum.quanto"):
        monkeypatch.setitem(sys.modules, name, None)  # the import fails, installed or not
    models.clear_cache()
    with pytest.raises(BadInput, match=rf"quantize={how} needs {package}, which is not installed: "
                                       r"pip install 'fluxbridge\[quant\]'"):
        load(how)


def test_inside_comfyui_quantized_layers_are_never_cast(comfy_stubs, reference, monkeypatch):
    """ComfyUI's cast cannot move a torchao tensor (`comfy.model_management.cast_to` makes the copy with
    `torch.empty_like(weight, device=...)`, which torchao's tensors do not implement), and `--novram` loads
    even a model that asks for a full load partly. So the quantized Linear layers must stay plain torch
    layers, which ComfyUI never casts: under --novram the host keeps them whole on the compute device, the
    rest (norms, embeddings) is left behind and cast in, and the output is unchanged."""
    pytest.importorskip("torchao")
    cs = comfy_stubs
    ops = sys.modules["comfy.ops"]
    with pytest.raises(NotImplementedError):  # why: what ComfyUI's cast does to a weight on another device
        torch.empty_like(load_quantized_linear(), device="meta")
    models.clear_cache()
    tr, _ = models.load_transformer(reference[1] / "diffusion_models" / NAME, weight_dtype="fp32", quantize="int8")
    quantized = [m for m in tr.module.modules() if isinstance(m, torch.nn.Linear)]
    assert quantized and all(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in quantized)
    assert not any(isinstance(m, ops.CastWeightBiasOp) for m in quantized)
    assert any(isinstance(m, ops.CastWeightBiasOp) for m in tr.module.modules())  # the other layers can be cast
    before = forward(tr.module)
    monkeypatch.setattr(cs.mm, "vram_state", cs.mm.VRAMState.NO_VRAM)
    monkeypatch.setattr(cs.mm, "_cpu_counts_as_gpu", True)
    cs.host.load_to_device([tr.handle])
    assert tr.handle._left_behind  # partly loaded, although a full load was asked for
    assert not any(getattr(m, "comfy_cast_weights", False) for m in quantized)
    assert torch.equal(forward(tr.module), before)
    models.clear_cache()


def load_quantized_linear():
    import torchao.quantization as tq
    layer = torch.nn.Sequential(torch.nn.Linear(32, 32))
    tq.quantize_(layer, tq.Int8WeightOnlyConfig())
    return layer[0].weight
