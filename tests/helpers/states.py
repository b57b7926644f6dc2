"""A module's state dict copied, and compared bit for bit (fp8 tensors by their bytes)."""
import torch


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module, snap) -> None:
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k].view(torch.uint8) if v.dtype.itemsize == 1 else now[k],
                                                       v.view(torch.uint8) if v.dtype.itemsize == 1 else v), k
