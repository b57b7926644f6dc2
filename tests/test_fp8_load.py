"""fp8 stays fp8 on load: a plain fp8 file (Linear weights F8_E4M3, the rest bf16, as the published fp8
FLUX.1 files are) and a ComfyUI scaled-fp8 file (per-tensor and per-row scales) load with their Linear weights
in fp8 (the file's bytes, no full-precision copy), and each layer upcasts as it runs: the output equals that of
loading the same file in the compute dtype, bitwise."""
import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.convert.load import load_model
from fluxbridge.convert.quant import quantize_fp8
from fluxbridge.headless.factory import tiny_flux_transformer
from model_state import as_bfl, assert_same_state, snapshot  # tests/helpers

E4M3 = torch.float8_e4m3fn
FLUX = "flux-transformer"
pytestmark = pytest.mark.usefixtures("one_thread")


def bfl_state(seed=3):
    return as_bfl(tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=seed, init_std=0.1).state_dict())


def write_fp8(path, scaled=False):
    """2-D weights in fp8 (scaled: ComfyUI's `scale_weight` + `scaled_fp8` marker; per-row on linear1), the
    rest (biases, norm scales) bf16."""
    out = {}
    for k, v in bfl_state().items():
        if v.dim() == 2:
            if scaled:
                q, s = quantize_fp8(v, E4M3, per_row=k.startswith("single_blocks.0.linear1"))
                out[k], out[k[:-len("weight")] + "scale_weight"] = q, s
            else:
                out[k] = v.to(E4M3)
        else:
            out[k] = v.to(torch.bfloat16)
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=E4M3)
    save_file(out, str(path))
    return out


def run(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(1, 4, 64, generator=g), encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        return model(**kw).sample


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_file_loads_in_fp8_and_computes_like_the_dequantized_load(tmp_path, scaled):
    path = tmp_path / "flux1-dev-fp8.safetensors"
    written = write_fp8(path, scaled)
    kept = load_model(path, dtype=torch.float32, fp8=E4M3)
    full = load_model(path, dtype=torch.float32)
    m = kept.model
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert all(mod.weight.dtype == E4M3 for mod in linears.values())  # every Linear weight: fp8 as stored
    assert kept.report["fp8_storage"] == {"float8_e4m3fn": len(linears)}
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if p.dtype != E4M3)  # biases, norms
    assert m.dtype == torch.float32  # the compute dtype, which the sampler reads
    # the file's bytes, not a copy: q and k are row views of the one fused qkv tensor of the file
    q, k = m.transformer_blocks[0].attn.to_q.weight, m.transformer_blocks[0].attn.to_k.weight
    assert q.view(torch.uint8).equal(written["double_blocks.0.img_attn.qkv.weight"][:32].view(torch.uint8))
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert not kept.origins.rereadable("transformer_blocks.0.attn.to_q.weight")
    if scaled:
        assert m.single_transformer_blocks[0].proj_mlp.weight_scale.shape == (128, 1)  # per row, split
        assert m.x_embedder.weight_scale.shape == ()
        assert "weight_scale" not in "".join(m.state_dict())  # not saved with the model
    assert torch.equal(run(m), run(full.model))
    assert all(mod.weight.dtype == E4M3 for mod in linears.values())  # still stored in fp8 afterwards


def test_wider_file_is_cast_to_fp8_except_where_layerwise_casting_skips(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in bfl_state().items()}, str(path))
    m = load_model(path, dtype=torch.float32, fp8=E4M3).model
    assert m.transformer_blocks[0].attn.to_q.weight.dtype == E4M3
    assert m.transformer_blocks[0].norm1.linear.weight.dtype == torch.float32  # a "norm" module: kept wide
    ref = load_model(path, dtype=torch.float32).model
    assert torch.equal(m.transformer_blocks[0].attn.to_q.weight.float(),
                       ref.transformer_blocks[0].attn.to_q.weight.to(E4M3).float())


@pytest.mark.parametrize("scaled", [False, True])
def test_lora_on_fp8_storage_computes_like_the_lora_on_the_dequantized_load(tmp_path, scaled):
    """A LoRA on fp8 storage runs as forward hooks beside the upcast layers: the model's output equals that
    of the dequantized load with the same LoRA applied to its weights (float32 rounding apart, the hook adds
    x·ΔWᵀ instead of folding ΔW into W), the fp8 bytes stay as stored, and removal gives the output back
    bitwise. Kohya keys on a fused qkv, linear1 (q, k, v and the MLP rows) and the swapped final layer."""
    from fluxbridge.convert.lora import apply_loras, load_lora
    path = tmp_path / "flux1-dev-fp8.safetensors"
    write_fp8(path, scaled)
    g = torch.Generator().manual_seed(7)
    sd = {}
    for module, (out, inp) in {"double_blocks_0_img_attn_qkv": (96, 32), "single_blocks_0_linear1": (224, 32),
                               "final_layer_adaLN_modulation_1": (64, 32)}.items():
        sd[f"lora_unet_{module}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.3
        sd[f"lora_unet_{module}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.3
        sd[f"lora_unet_{module}.alpha"] = torch.tensor(2.0)
    lora = load_lora(sd, name="kohya")
    kept = load_model(path, dtype=torch.float32, fp8=E4M3)
    full = load_model(path, dtype=torch.float32)
    bytes_before, before = snapshot(kept.model), run(kept.model)
    with apply_loras(full.model, FLUX, [(lora, 0.8)], origins=full.origins):
        want = run(full.model)
    with apply_loras(kept.model, FLUX, [(lora, 0.8)], origins=kept.origins) as h:
        assert h.reports[0]["applied"]["mode"] == {"dense": 0, "hook": 3}  # every part: its layers are fp8
        got = run(kept.model)
        assert_same_state(kept.model, bytes_before)
    assert not torch.allclose(want, before, atol=1e-3)  # the LoRA changes the output ...
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # ... and the hooks change it alike
    assert torch.equal(run(kept.model), before)
