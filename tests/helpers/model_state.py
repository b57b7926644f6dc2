"""A model's weights: before and after something that must leave them as they were (LoRA removal, interrupts),
and under their BFL names (what a test writes as a BFL checkpoint)."""
import torch


def snapshot(module) -> dict:
    """A copy of every tensor of the module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module, snap) -> None:
    """The module's state dict equals the snapshot bit for bit (fp8 tensors compared as bytes)."""
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k].view(torch.uint8) if v.dtype.itemsize == 1 else now[k],
                                                       v.view(torch.uint8) if v.dtype.itemsize == 1 else v), k


def as_bfl(model) -> dict:
    """A diffusers Flux transformer's weights under BFL's names and fused layout (as BFL's files hold them),
    through the flux layout table."""
    from fluxbridge.convert.families import flux
    from fluxbridge.convert.table import A, B, materialize

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    plan, _ = flux.TABLE.convert({k: tuple(v.shape) for k, v in sd.items()}, B, A)
    return {k: materialize(step, sd.__getitem__).contiguous() for k, step in plan.items()}
