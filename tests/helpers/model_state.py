"""A model's weights before and after something that must leave them as they were (LoRA removal, interrupts)."""
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
