"""A whole tiny Flux transformer written as a GGUF file the way city96's are (BFL names, 2-D weights
quantized, 1-D tensors F32), with gguf-py's own writer and quantizer."""
from pathlib import Path

import numpy as np


def write_flux_gguf(model, path: Path, qtype_name: str = "Q8_0", f16=("img_in.weight",)) -> dict[str, str]:
    """Write `model` (a diffusers FluxTransformer2DModel) to `path`; returns {BFL name: ggml type name}.
    2-D weights whose rows are whole blocks go in `qtype_name`, those named in `f16` in F16, the rest F32."""
    import gguf

    from model_state import as_bfl

    q = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[q][0]
    w = gguf.GGUFWriter(str(path), "flux")
    types = {}
    for name, t in as_bfl(model.state_dict()).items():
        x = t.float().numpy()
        if name in f16:
            w.add_tensor(name, x.astype(np.float16))
            types[name] = "F16"
        elif x.ndim == 2 and x.shape[1] % block == 0:
            raw = gguf.quants.quantize(x.astype(np.float32), q)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=q)
            types[name] = qtype_name
        else:
            w.add_tensor(name, x.astype(np.float32))
            types[name] = "F32"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def tiny_model():
    from fluxbridge.headless.factory import tiny_flux_transformer
    return tiny_flux_transformer(width=64, heads=2, double=1, single=1, seed=3)

