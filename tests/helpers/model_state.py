"""A model's weights: before and after something that must leave them as they were (LoRA removal, interrupts),
and through a layout table (what a test writes as a checkpoint of another layout)."""
import torch


def snapshot(module) -> dict:
    """A copy of every tensor of the module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module, snap) -> None:
    """The module's state dict equals the snapshot bit for bit (fp8 tensors compared as bytes)."""
    assert_same_tensors(module.state_dict(), snap)


def shapes_of(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def convert_state(table, sd, src, dst, config={}) -> tuple[dict, dict]:
    """A state dict through a layout table from side `src` to side `dst` (contiguous tensors, as a written file
    holds them), and the table's report."""
    from fluxbridge.convert.table import materialize

    plan, report = table.convert(shapes_of(sd), src, dst, config)
    return {k: materialize(step, sd.__getitem__).contiguous() for k, step in plan.items()}, report


def as_bfl(sd) -> dict:
    """A diffusers Flux transformer's state dict under BFL's names and fused layout (as BFL's files hold it)."""
    from fluxbridge.convert.families import flux
    from fluxbridge.convert.table import A, B

    return convert_state(flux.TABLE, sd, B, A)[0]


def assert_same_tensors(x: dict, y: dict) -> None:
    """Two state dicts hold the same keys and the same tensors bit for bit (dtype, shape, bytes)."""
    assert x.keys() == y.keys(), sorted(set(x) ^ set(y))
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and torch.equal(_bytes(x[k]), _bytes(y[k])), k


def _bytes(t):
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t  # fp8 compared as bytes
