"""A LoRA stack is applied once and stays while the same stack is used; another stack (or none) removes it
first. Removal is bitwise, and holds no second copy where the model file can give the originals again
(`convert.origins`); the report says which path each original took. Models are loaded by our loaders from
files in the usual layouts (a bf16 BFL checkpoint, loaded in float32 on the CPU: the weights are copies)."""
import os

import pytest
import torch
from safetensors.torch import save_file

from fluxbridge.convert.lora import apply as apply_mod
from fluxbridge.convert.lora import apply_loras, load_lora
from fluxbridge.convert.lora import patch as patch_mod
from fluxbridge.headless.factory import save_layout, tiny_flux_transformer
from fluxbridge.runtime import models
from model_state import assert_same_state as assert_bitwise, snapshot as state  # tests/helpers

FLUX = "flux-transformer"
pytestmark = pytest.mark.usefixtures("one_thread")


def kohya_lora(path, seed, modules=("double_blocks_0_img_attn_qkv", "single_blocks_0_linear1",
                                    "double_blocks_0_img_mlp_0", "final_layer_adaLN_modulation_1")):
    shapes = {"double_blocks_0_img_attn_qkv": (96, 32), "single_blocks_0_linear1": (224, 32),
              "double_blocks_0_img_mlp_0": (128, 32), "final_layer_adaLN_modulation_1": (64, 32),
              "double_blocks_0_img_attn_proj": (32, 32)}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in modules:
        out, inp = shapes[m]
        sd[f"lora_unet_{m}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.3
        sd[f"lora_unet_{m}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.3
        sd[f"lora_unet_{m}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
    return path


@pytest.fixture
def files(on_host):
    m = tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=7, dtype=torch.bfloat16)
    dev = save_layout(m, on_host / "diffusion_models" / "flux1-dev.safetensors", "bfl")
    return {"dev": dev, "a": kohya_lora(on_host / "loras" / "a.safetensors", 1),
            "b": kohya_lora(on_host / "loras" / "b.safetensors", 2, ("double_blocks_0_img_attn_qkv",
                                                                    "double_blocks_0_img_attn_proj"))}


def reference(files, *stack):
    """A separately loaded copy of the model with `stack` applied (no registry, originals kept)."""
    from fluxbridge.convert.load import load_model
    m = load_model(files["dev"], dtype=torch.float32).model
    apply_loras(m, FLUX, [(load_lora(files[name]), s) for name, s in stack])
    return state(m)


def test_two_branches_with_different_stacks_alternate_on_one_base(files, monkeypatch):
    models.clear_cache()
    base, _ = models.load_transformer(files["dev"])
    snap = state(base.module)
    a = base.with_lora("a", models.open_lora(files["a"]), 0.8)
    ab = a.with_lora("b", models.open_lora(files["b"]), -0.5)
    b = base.with_lora("b", models.open_lora(files["b"]), 1.0)
    want = {"a": reference(files, ("a", 0.8)), "ab": reference(files, ("a", 0.8), ("b", -0.5)),
            "b": reference(files, ("b", 1.0))}
    computed = []
    real = patch_mod.Plan.compute
    monkeypatch.setattr(patch_mod.Plan, "compute", lambda self, *x, **k: computed.append(1) or real(self, *x, **k))
    for _ in range(2):
        for name, model in (("a", a), ("ab", ab), ("b", b), ("base", base), ("a", a)):
            with model.patched() as module:
                assert module is base.module
                assert_bitwise(module, snap if name == "base" else want[name])
    n = len(computed)
    for _ in range(3):  # the same stack again (the next step of a loop): nothing is computed
        with a.patched():
            pass
    assert len(computed) == n
    # the same file opened again (the LoRA cache dropped it) is the same stack: not applied again
    models._cache.pop(models.cache_key("lora", files["a"]))
    with base.with_lora("a", models.open_lora(files["a"]), 0.8).patched():
        assert len(computed) == n
    with base.with_lora("a", models.open_lora(files["a"]), 0.7).patched():  # another strength: another stack
        assert len(computed) > n
    models.clear_cache()  # a model leaves the cache clean
    assert models.applied_handle(base.module) is None
    assert_bitwise(base.module, snap)


def test_copies_are_read_again_views_are_kept_and_nothing_else_is_held(files, on_host, monkeypatch):
    """Loaded with a cast (bf16 file, float32 compute) the weights are copies: the originals are dropped
    while applied and read again from the file on removal, bitwise. Loaded without a cast they are views of
    the file: kept, at no cost. A file changed on disk since the load, or GGUF blocks: kept, and said why."""
    from fluxbridge.convert.load import load_model
    lora = load_lora(files["a"])
    loaded = load_model(files["dev"], dtype=torch.float32)
    m, snap = loaded.model, state(loaded.model)
    h = apply_loras(m, FLUX, [(lora, 1.0)], origins=loaded.origins)
    patched = len(h._originals)
    assert h.originals == {"file_views": 0, "reread": patched, "kept": 0}
    assert h.reports[0]["applied"]["originals"]["kept_why"] is None
    held = [o for _, _, o in h._originals if isinstance(o, (apply_mod._Kept, apply_mod._View))]
    assert held == []  # no tensor of the originals is referenced while applied
    with torch.no_grad():  # the parameter's storage changed meanwhile (as a move between devices does)
        for p in m.parameters():
            p.data = p.data.clone()
    h.remove()
    assert_bitwise(m, snap)

    views = load_model(files["dev"], dtype=torch.bfloat16)  # no cast: the parameters are the file's bytes
    vsnap = state(views.model)
    with apply_loras(views.model, FLUX, [(lora, 1.0)], origins=views.origins) as h:
        # the final layer's halves were swapped on load (a new tensor): that one is read again
        assert h.originals == {"file_views": patched - 1, "reread": 1, "kept": 0}
        assert [n for n, _, o in h._originals if o is apply_mod.READ] == ["norm_out.linear.weight"]
    assert_bitwise(views.model, vsnap)

    st = os.stat(files["dev"])  # the file changes on disk after the load: keep the originals instead
    os.utime(files["dev"], ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    with apply_loras(m, FLUX, [(lora, 1.0)], origins=loaded.origins) as h:
        assert h.originals == {"file_views": 0, "reread": 0, "kept": patched}
        assert "changed on disk" in h.reports[0]["applied"]["originals"]["kept_why"]
    assert_bitwise(m, snap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_handles_applied_one_over_another_come_off_one_by_one(files, dtype):
    """Two handles on one model (the library allows it; the nodes keep one per model): removing the second
    gives back the model with the first applied, not the file's weights; then the first gives back the base.
    Loaded in float32 the weights are copies (read again from the file), in bf16 views of the file."""
    from fluxbridge.convert.load import load_model
    loaded = load_model(files["dev"], dtype=dtype)
    m, base = loaded.model, state(loaded.model)
    first = apply_loras(m, FLUX, [(load_lora(files["a"]), 1.0)], origins=loaded.origins)
    with_a = state(m)
    second = apply_loras(m, FLUX, [(load_lora(files["b"]), 0.5)], origins=loaded.origins)
    assert second.originals["kept"] == 3  # q, k, v: patched by the first; the file no longer gives them
    assert "another LoRA handle" in second.reports[0]["applied"]["originals"]["kept_why"]
    second.remove()
    assert_bitwise(m, with_a)
    first.remove()
    assert_bitwise(m, base)
    with apply_loras(m, FLUX, [(load_lora(files["b"]), 1.0)], origins=loaded.origins) as h:
        assert h.originals["kept"] == 0  # the base again: read from the file as before
    assert_bitwise(m, base)


@pytest.mark.parametrize("change", ["renamed over", "written over", "cut short"])
def test_the_model_file_changing_while_a_lora_is_applied(files, change):
    """The originals are read back from the model file on removal, maybe long after apply. A file renamed
    over meanwhile (a download, our own writer) is still read through the descriptor held since apply: its
    old bytes, bitwise. A file written over in place (`cp`) or cut short is refused with BadInput naming it:
    no other values go into the model, and what could not be restored stays patched and listed on the handle."""
    import struct

    from fluxbridge.common.errors import BadInput
    from fluxbridge.convert.load import load_model
    path = files["dev"]
    loaded = load_model(path, dtype=torch.float32)  # a cast: copies, read again on removal
    m, snap = loaded.model, state(loaded.model)
    h = apply_loras(m, FLUX, [(load_lora(files["a"]), 1.0)], origins=loaded.origins)
    patched, applied = [n for n, _, _ in h._originals], state(m)
    assert h.originals["reread"] == len(patched) > 0
    if change == "renamed over":
        other = save_layout(tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=8,
                                                  dtype=torch.bfloat16), path.with_name("new.safetensors"), "bfl")
        os.replace(other, path)
        h.remove()
        assert_bitwise(m, snap)
        return
    with open(path, "r+b") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        if change == "written over":
            f.seek(data_start)
            f.write(bytes(os.path.getsize(path) - data_start))
        else:
            f.truncate(data_start + 16)
    st = os.stat(path)  # a later modification time, whatever the clock's resolution
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    with pytest.raises(BadInput, match="changed on disk") as err:
        h.remove()
    assert str(path) in str(err.value)
    now = state(m)
    for k, v in snap.items():  # nothing took the file's new values: restored where possible, else as applied
        assert torch.equal(now[k], applied[k] if k in patched else v), k
    assert h.originals["reread"] == len(patched)
    with pytest.raises(BadInput):  # and it stays so
        h.remove()


def test_a_cached_model_whose_file_was_written_over_under_its_stack(files):
    """The stack cannot come off a cached model whose file was written over in place: each use of that model
    says so, naming the file (never the same stack "already applied" to half-restored weights, never a
    stack over them), and loading the file again gives the new file's model, clean."""
    import struct

    from fluxbridge.common.errors import BadInput
    models.clear_cache()
    path = files["dev"]
    base, _ = models.load_transformer(path)
    a = base.with_lora("a", models.open_lora(files["a"]), 1.0)
    with a.patched():
        pass
    with open(path, "r+b") as f:  # `cp new old`: the same file, other bytes
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        f.seek(data_start)
        f.write(bytes(os.path.getsize(path) - data_start))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    b = base.with_lora("b", models.open_lora(files["b"]), 1.0)
    for use in (base, a, b, a):
        with pytest.raises(BadInput, match="changed on disk") as err:
            with use.patched():
                pass
        assert str(path) in str(err.value)
    fresh, cached = models.load_transformer(path)  # the stale entry is dropped without stopping the load
    assert not cached and fresh.module is not base.module
    assert all(torch.count_nonzero(v) == 0 for v in state(fresh.module).values())  # the zeros written
    assert models.applied_handle(fresh.module) is None
    models.clear_cache()


def test_gguf_dequantized_originals_are_kept(tmp_path):
    pytest.importorskip("gguf")
    from gguf_flux import write_flux_gguf  # tests/helpers

    from fluxbridge.convert.load import load_model
    write_flux_gguf(tiny_flux_transformer(width=32, heads=2, double=1, single=1, seed=7), tmp_path / "m.gguf")
    loaded = load_model(tmp_path / "m.gguf", dtype=torch.float32)
    snap = state(loaded.model)
    lora = load_lora(kohya_lora(tmp_path / "a.safetensors", 1))
    with apply_loras(loaded.model, FLUX, [(lora, 1.0)], origins=loaded.origins) as h:
        counts = h.originals
        assert counts["kept"] > 0 and counts["reread"] == 0
        assert h.reports[0]["applied"]["originals"]["kept_why"] == "dequantized from GGUF blocks"
    assert_bitwise(loaded.model, snap)


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_a_failure_half_way_leaves_the_base_as_it_was(files, monkeypatch, fault):
    """Patching in place fails half-way (an error, or an interrupt, at the third row block: the blocks before
    it are already written into the parameter): what was patched is read back from the file; no stack is
    recorded; the next use applies it whole."""
    models.clear_cache()
    base, _ = models.load_transformer(files["dev"])
    snap = state(base.module)
    a = base.with_lora("a", models.open_lora(files["a"]), 1.0)
    real, calls = patch_mod._RowTerm.add, []

    def flaky(self, w, r0, n):
        real(self, w, r0, n)
        calls.append(1)
        if len(calls) == 3:
            raise fault("injected")
    monkeypatch.setattr(patch_mod, "CHUNK", 1 << 8)  # several row blocks per tensor
    monkeypatch.setattr(patch_mod._RowTerm, "add", flaky)
    with pytest.raises(fault):
        with a.patched():
            pass
    assert_bitwise(base.module, snap)
    assert models.applied_handle(base.module) is None
    monkeypatch.undo()
    with a.patched() as module:
        assert_bitwise(module, reference(files, ("a", 1.0)))
    with base.patched() as module:
        assert_bitwise(module, snap)
    models.clear_cache()


def test_scheduler_steps_apply_the_stack_once(files, monkeypatch):
    """A custom loop of SchedulerStep nodes (and the text encode before it) applies the stack once."""
    from node_graph import run as run_node  # tests/helpers

    from fluxbridge.nodes import latent, sampling
    models.clear_cache()
    base, _ = models.load_transformer(files["dev"])
    tr = base.with_lora("a", models.open_lora(files["a"]), 1.0)
    applied = []
    real = apply_mod.apply_loras
    monkeypatch.setattr(apply_mod, "apply_loras", lambda *a, **k: applied.append(1) or real(*a, **k))
    cond = [[torch.randn(1, 8, 32), {"pooled_output": torch.randn(1, 32), "guidance": 3.5}]]
    (empty,), _ = run_node(latent.EmptyLatent, width=64, height=64, batch_size=1)
    (sig,), _ = run_node(sampling.Scheduler, steps=6, width=64, height=64, denoise=1.0, shift="auto", transformer=tr)
    (x,), _ = run_node(sampling.AddNoise, latent=empty, sigmas=sig, seed=1)
    for step in range(6):
        (x,), _ = run_node(sampling.SchedulerStep, transformer=tr, positive=cond, latent=x, sigmas=sig, step=step)
    assert applied == [1]
    models.clear_cache()
