"""Applying and removing: stacking, bitwise unpatch, atomicity under injected failures, dtypes, quantized
bases (fp8 storage with upcast compute, a GGUF-like layer) patched on the fly, text encoders, and
baking (convert --lora) equal to applying."""
import json

import pytest
import torch

from fluxbridge.convert.lora import LoraSet, apply_loras, apply_to_models, load_lora, patch_tensors
from fluxbridge.convert.lora import apply as apply_mod
from fluxbridge.convert.lora import patch as patch_mod
from fluxbridge.convert.lora.synth import Entry, write_keys
from fluxbridge.headless.factory import tiny_clip_l, tiny_flux_transformer, tiny_t5
from model_state import as_bfl, assert_same_state as assert_bitwise, snapshot  # tests/helpers

FLUX = "flux-transformer"


pytestmark = pytest.mark.usefixtures("one_thread")


def model(dtype=torch.float32, **kw):
    return tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=5, dtype=dtype, **kw)


def lora_of(fmt, names, gen, rank=4, alpha=8.0, name="l", std=0.3):
    m = model()
    sd = m.state_dict()
    entries = []
    for n in names:
        out, inp = _shape(n, sd)
        entries.append(Entry(n, "lora", {"down": torch.randn(rank, inp, generator=gen) * std,
                                         "up": torch.randn(out, rank, generator=gen) * std}, alpha))
    sd_, meta = write_keys(entries, fmt)
    return load_lora(sd_, meta, name=name), entries


_FUSED = {"double_blocks.0.img_attn.qkv": (96, 32), "single_blocks.0.linear1": (224, 32),
          "final_layer.adaLN_modulation.1": (64, 32), "double_blocks.0.img_mlp.0": (128, 32),
          "single_blocks.0.linear2": (32, 160), "img_in": (32, 64)}


def _shape(name, sd):
    if name in _FUSED:
        return _FUSED[name]
    return tuple(sd[name + ".weight"].shape)


KOHYA = list(_FUSED)
DIFF = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp",
        "norm_out.linear", "proj_out", "transformer_blocks.0.ff.net.2"]


def run(m, seed=0, in_ch=64):
    g = torch.Generator().manual_seed(seed)
    p = next(iter(m.parameters()))
    dt = p.dtype if p.dtype.itemsize > 1 else torch.float32
    kw = dict(hidden_states=torch.randn(1, 4, in_ch, generator=g).to(dt),
              encoder_hidden_states=torch.randn(1, 3, 32, generator=g).to(dt),
              pooled_projections=torch.randn(1, 32, generator=g).to(dt), timestep=torch.tensor([0.5]).to(dt),
              img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.5]).to(dt))
    with torch.no_grad():
        return m(**kw).sample


def test_stacking_strengths_and_bitwise_unpatch():
    gen = torch.Generator().manual_seed(0)
    m = model()
    snap = snapshot(m)
    k, _ = lora_of("kohya", KOHYA, gen, name="k")
    d, _ = lora_of("diffusers", DIFF, gen, alpha=None, name="d")
    h = apply_loras(m, FLUX, [(k, 0.7), (d, -1.3)], originals_device="cpu")
    assert [r["applied"]["strength"] for r in h.reports] == [0.7, -1.3]
    json.dumps(h.reports)  # JSON-able
    stacked = snapshot(m)
    h.remove()
    assert_bitwise(m, snap)
    # stacking = the sum of the single deltas (additive kinds commute)
    with apply_loras(m, FLUX, [(k, 0.7)]):
        one = snapshot(m)
    with apply_loras(m, FLUX, [(d, -1.3)]):
        two = snapshot(m)
    for name in snap:
        want = (one[name].double() - snap[name].double()) + (two[name].double() - snap[name].double())
        torch.testing.assert_close(stacked[name].double() - snap[name].double(), want, rtol=1e-5, atol=1e-6)
    assert_bitwise(m, snap)
    h.remove()  # idempotent
    assert_bitwise(m, snap)


def test_bf16_weights_fp32_arithmetic_cast_back():
    gen = torch.Generator().manual_seed(1)
    m = model(torch.bfloat16)
    snap = snapshot(m)
    k, entries = lora_of("kohya", ["double_blocks.0.img_mlp.0"], gen, alpha=2.0)
    with apply_loras(m, FLUX, [(k, 0.5)]):
        e = entries[0]
        want = (snap["transformer_blocks.0.ff.net.0.proj.weight"].float()
                + 0.5 * ((e.tensors["up"] @ e.tensors["down"]) * (2.0 / 4))).to(torch.bfloat16)
        assert torch.equal(m.transformer_blocks[0].ff.net[0].proj.weight, want)
        assert m.transformer_blocks[0].ff.net[0].proj.weight.dtype == torch.bfloat16
    assert_bitwise(m, snap)


def test_patched_tensors_go_in_one_closure_at_a_time(monkeypatch):
    """Each closure is swapped in before the next is computed, so an offloaded original leaves the model's
    device before the next new tensor is made there; a callable `originals_device` is asked once, with the
    bytes of the originals to keep, and its answer is used for every tensor."""
    gen = torch.Generator().manual_seed(4)
    m = model()
    snap = snapshot(m)
    k, _ = lora_of("kohya", KOHYA, gen, name="k")
    events, asked = [], []
    real_compute, real_assign = patch_mod.Plan.compute, apply_mod._assign

    def compute(self, params, *a, **kw):
        out = real_compute(self, params, *a, **kw)
        events.append(("compute", sorted(out)))
        return out

    def assign(handle, name, param, tensor, how, keep_on=None):
        events.append(("assign", keep_on))
        return real_assign(handle, name, param, tensor, how, keep_on)

    def where(nbytes):
        asked.append(nbytes)
        return "cpu"

    monkeypatch.setattr(patch_mod.Plan, "compute", compute)
    monkeypatch.setattr(apply_mod, "_assign", assign)
    params = dict(m.named_parameters())
    with apply_loras(m, FLUX, [(k, 1.0)], originals_device=where) as h:
        patched = {n for n, p in m.named_parameters() if not torch.equal(p, snap[n])}
        kinds = [e[0] for e in events]
        assert kinds == ["compute", "assign"] * (len(kinds) // 2)  # one tensor per closure here
        assert {e[1] for e in events if e[0] == "assign"} == {"cpu"}
        assert asked == [sum(snap[n].nbytes for n in patched)]
        assert len(h._originals) == len(patched) and all(params[n] is p for n, p in m.named_parameters())
    assert_bitwise(m, snap)


def test_node_models_ask_the_host_where_originals_wait(monkeypatch):
    from fluxbridge.runtime import host, models
    gen = torch.Generator().manual_seed(6)
    m = model()
    snap = snapshot(m)
    k, _ = lora_of("kohya", KOHYA, gen, name="k")
    asked = []
    monkeypatch.setattr(host, "lora_originals_device", lambda device, nbytes: asked.append((device, nbytes)))
    models.use_stack(m, FLUX, (models.LoraEntry("k", k, 1.0),), lambda e: e.strength)  # no origins: all kept
    patched = [n for n, p in m.named_parameters() if not torch.equal(p, snap[n])]
    assert patched and asked == [(torch.device("cpu"), sum(snap[n].nbytes for n in patched))]
    models.release_loras(m)
    assert_bitwise(m, snap)


@pytest.mark.parametrize("where", ["compute", "swap"])
def test_injected_failure_leaves_model_bitwise_unchanged(monkeypatch, where):
    gen = torch.Generator().manual_seed(2)
    m = model()
    snap = snapshot(m)
    k, _ = lora_of("kohya", KOHYA, gen, name="k")
    calls = {"n": 0}
    if where == "compute":  # the 5th tensor's computation fails
        real = patch_mod.Plan.compute

        def flaky(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("injected")
            return real(self, *a, **kw)
        monkeypatch.setattr(patch_mod.Plan, "compute", flaky)
    else:
        real = apply_mod._assign

        def flaky(*args):
            calls["n"] += 1
            if calls["n"] == 4:  # three tensors already swapped in
                raise RuntimeError("injected")
            return real(*args)
        monkeypatch.setattr(apply_mod, "_assign", flaky)
    hooks_before = sum(len(mod._forward_hooks) for mod in m.modules())
    with pytest.raises(RuntimeError, match="injected"):
        apply_loras(m, FLUX, [(k, 1.0)])
    assert calls["n"] in (4, 5)
    assert_bitwise(m, snap)
    assert sum(len(mod._forward_hooks) for mod in m.modules()) == hooks_before
    monkeypatch.undo()
    with apply_loras(m, FLUX, [(k, 1.0)]):  # and it still works afterwards
        assert not torch.equal(m.transformer_blocks[0].attn.to_q.weight, snap["transformer_blocks.0.attn.to_q.weight"])
    assert_bitwise(m, snap)


def test_fp8_storage_base_is_patched_on_the_fly():
    """Weights stored in float8 (diffusers layerwise casting, compute in float32): the weights stay fp8
    bitwise, a forward hook adds the LoRA; the output equals a dense model holding W + ΔW."""
    gen = torch.Generator().manual_seed(3)
    m = model()
    m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert m.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    snap = snapshot(m)
    base_out = run(m)
    # reference: a dense float32 model holding the fp8 weights dequantized, the same LoRA baked in
    ref = model()
    with torch.no_grad():
        for (n, p), (_, q) in zip(ref.named_parameters(), m.named_parameters()):
            p.copy_(q.float())
    k, _ = lora_of("kohya", KOHYA, gen, std=0.2, name="k")
    h = apply_loras(m, FLUX, [(k, 0.8)])
    report = h.reports[0]["applied"]
    assert report["mode"]["hook"] > 0 and report["mode"]["dense"] > 0  # norm_out stays float32 in diffusers
    for name, p in m.named_parameters():
        if p.dtype == torch.float8_e4m3fn:
            assert torch.equal(p.view(torch.uint8), snap[name].view(torch.uint8)), name
    patched_out = run(m)
    with apply_loras(ref, FLUX, [(k, 0.8)]):
        want = run(ref)
    torch.testing.assert_close(patched_out, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(patched_out, base_out, atol=1e-3)
    h.remove()
    assert torch.equal(run(m), base_out)
    assert_bitwise(m, snap)


class QLinear(torch.nn.Module):
    """A GGUF-like layer: int8 rows with a per-row scale, dequantized in forward."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter((w / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.float() * self.scale, self.bias)


def test_gguf_like_quantized_layers_keep_their_storage():
    gen = torch.Generator().manual_seed(4)
    m = model()
    attn = m.transformer_blocks[0].attn
    attn.to_q, attn.to_k = QLinear(attn.to_q), QLinear(attn.to_k)
    m.single_transformer_blocks[0].proj_mlp = QLinear(m.single_transformer_blocks[0].proj_mlp)
    snap = snapshot(m)
    k, entries = lora_of("kohya", ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1",
                                   "double_blocks.0.img_mlp.0"], gen, name="k")
    dense = model()
    with torch.no_grad():
        for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                     "single_transformer_blocks.0.proj_mlp"):
            q = m.get_submodule(name)
            dense.get_submodule(name).weight.copy_(q.weight.float() * q.scale)
    with apply_loras(m, FLUX, [(k, 1.0)]) as h:
        # qkv and linear1 each touch a quantized layer: added on the fly; img_mlp.0 is dense
        assert h.reports[0]["applied"]["mode"] == {"dense": 1, "hook": 2}
        assert m.transformer_blocks[0].attn.to_q.weight.dtype == torch.int8
        got = run(m)
        with apply_loras(dense, FLUX, [(k, 1.0)]):
            torch.testing.assert_close(got, run(dense), rtol=1e-4, atol=1e-4)
    assert_bitwise(m, snap)


def test_quantized_base_refuses_dora_with_a_reason():
    gen = torch.Generator().manual_seed(5)
    m = model()
    m.transformer_blocks[0].attn.to_q = QLinear(m.transformer_blocks[0].attn.to_q)
    e = Entry("transformer_blocks.0.attn.to_q", "lora", {"down": torch.randn(2, 32, generator=gen),
                                                         "up": torch.randn(32, 2, generator=gen),
                                                         "magnitude": torch.rand(32, generator=gen) + 1})
    lora = load_lora(write_keys([e], "diffusers")[0], name="dora")
    with apply_loras(m, FLUX, [lora]) as h:
        reasons = [d["reason"] for d in h.reports[0]["not_placed"]]
        assert any("DoRA on a quantized base" in r for r in reasons)


def test_text_encoders_with_text_strength():
    gen = torch.Generator().manual_seed(6)
    clip, t5 = tiny_clip_l(seed=1), tiny_t5(seed=1)
    fl = model()
    snaps = {n: snapshot(x) for n, x in (("clip", clip), ("t5", t5), ("flux", fl))}
    clip_e = [Entry("text_model.encoder.layers.0.self_attn.q_proj", "lora",
                    {"down": torch.randn(2, 32, generator=gen), "up": torch.randn(32, 2, generator=gen)}, 4.0),
              Entry("text_model.encoder.layers.1.mlp.fc2", "lora",
                    {"down": torch.randn(2, 64, generator=gen), "up": torch.randn(32, 2, generator=gen)}, 4.0)]
    t5_e = [Entry("encoder.block.0.layer.0.SelfAttention.q", "lora",
                  {"down": torch.randn(2, 32, generator=gen), "up": torch.randn(32, 2, generator=gen)}, 2.0),
            Entry("encoder.block.1.layer.1.DenseReluDense.wi_1", "lora",
                  {"down": torch.randn(2, 32, generator=gen), "up": torch.randn(64, 2, generator=gen)}, 2.0)]
    unet = [Entry("double_blocks.0.img_attn.proj", "lora",
                  {"down": torch.randn(2, 32, generator=gen), "up": torch.randn(32, 2, generator=gen)}, 2.0)]
    for te1, te_t5 in (("kohya-te1", "kohya-te3"), ("kohya-te1", "kohya-te2"), ("comfy-clip", "comfy-t5")):
        sd = {**write_keys(unet, "kohya")[0], **write_keys(clip_e, te1)[0], **write_keys(t5_e, te_t5)[0]}
        lora = load_lora(sd, name=te_t5)
        assert lora.report["text_encoder_parts"] == {"clip-l": 2, "t5-xxl": 2}, lora.report
        with apply_to_models({"flux-transformer": fl, "clip-l": clip, "t5-xxl": t5}, [(lora, 1.0)],
                             strength_text=0.25) as handle:
            assert handle.reports["t5-xxl"][0]["applied"]["patched"] == [
                "encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_1"]
            for net, entries, snap in ((clip, clip_e, snaps["clip"]), (t5, t5_e, snaps["t5"])):
                for e in entries:
                    key = e.name.removeprefix("text_model.") + ".weight"
                    if key not in snap:
                        key = e.name + ".weight"
                    want = 0.25 * (e.alpha / 2) * e.tensors["up"] @ e.tensors["down"]
                    torch.testing.assert_close(net.state_dict()[key] - snap[key], want, rtol=1e-5, atol=1e-6)
            e = unet[0]
            torch.testing.assert_close(fl.transformer_blocks[0].attn.to_out[0].weight
                                       - snaps["flux"]["transformer_blocks.0.attn.to_out.0.weight"],
                                       (e.tensors["up"] @ e.tensors["down"]), rtol=1e-5, atol=1e-6)
        for n, x in (("clip", clip), ("t5", t5), ("flux", fl)):
            assert_bitwise(x, snaps[n])


def test_bake_equals_apply_bitwise():
    """`convert --lora` goes through LoraSet.patched_getter / patch_tensors: the same Plan.compute as
    apply_loras, so the tensors are identical, bit for bit (bf16 model, DoRA and a fused source)."""
    gen = torch.Generator().manual_seed(7)
    m = model(torch.bfloat16)
    k, _ = lora_of("kohya", KOHYA[:-1], gen, name="k")  # no img_in: the file keeps its shapes
    dora = Entry("double_blocks.0.txt_attn.qkv", "lora", {"down": torch.randn(3, 32, generator=gen),
                                                         "up": torch.randn(96, 3, generator=gen),
                                                         "dora_scale": torch.rand(1, 32, generator=gen) + 1}, 3.0)
    d = load_lora(write_keys([dora], "kohya")[0], name="dora")
    weights = {n: t.clone() for n, t in m.state_dict().items()}

    class Step:
        def __init__(self, shape):
            self.shape = shape
    lset = LoraSet([(k, 0.6), (d, 1.5)])
    getter, report, expanded = lset.patched_getter(FLUX, {n: Step(tuple(t.shape)) for n, t in weights.items()},
                                         weights.__getitem__)
    baked = {n: getter(n) for n in weights}
    direct = patch_tensors([(k, 0.6), (d, 1.5)], FLUX, weights)
    with apply_loras(m, FLUX, [(k, 0.6), (d, 1.5)]):
        applied = m.state_dict()
        for n in weights:
            assert torch.equal(baked[n], applied[n]), n
            if n in direct:
                assert torch.equal(direct[n], applied[n]), n
    assert {r["name"] for r in report} == {"k", "dora"} and expanded == {}


def test_spec_parsing():
    from fluxbridge.convert.lora.bake import parse_spec
    assert parse_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_spec("C:") == ("C:", 1.0)
    assert parse_spec(r"C:\x\y.safetensors") == (r"C:\x\y.safetensors", 1.0)
    assert parse_spec("x.safetensors:-1e-1") == ("x.safetensors", -0.1)


def test_convert_with_lora_equals_apply(tmp_path):
    """`fluxbridge convert SRC DST --lora FILE:0.5` (a BFL bf16 checkpoint to diffusers) writes exactly
    the tensors of the model patched in memory."""
    from safetensors.torch import load_file, save_file

    from fluxbridge.convert.write import convert_file
    gen = torch.Generator().manual_seed(8)
    m = model(torch.bfloat16)
    save_file(as_bfl(m.state_dict()), tmp_path / "bfl.safetensors")
    k, _ = lora_of("kohya", KOHYA[:-1], gen, name="k")
    save_file(write_keys(_, "kohya")[0], tmp_path / "k.safetensors")
    report = convert_file(tmp_path / "bfl.safetensors", tmp_path / "out.safetensors", "diffusers", "keep",
                          [(str(tmp_path / "k.safetensors"), 0.5)])
    assert report["components"][0]["loras"][0]["patched"]
    out = load_file(tmp_path / "out.safetensors")
    with apply_loras(m, FLUX, [(load_lora(tmp_path / "k.safetensors"), 0.5)]):
        for name, t in m.state_dict().items():
            assert torch.equal(t, out[name]), name
