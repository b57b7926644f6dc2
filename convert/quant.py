"""fp8 weights: plain fp8, ComfyUI "scaled fp8" and the newer `comfy_quant` form, seen as logical weights.

* Plain fp8 (`F8_E4M3` / `F8_E5M2` tensors, no scales): the value is a cast (exact into bf16 or fp32).
* Scaled fp8 (ComfyUI): a marker tensor `scaled_fp8` (any prefix; 2 elements = full-precision matmul)
  and per Linear `<layer>.weight` (fp8) + `<layer>.scale_weight` (+ optional `<layer>.scale_input`).
* Newer ComfyUI: `<layer>.weight` + `<layer>.weight_scale` (+ optional `<layer>.input_scale`) with the
  format in `<layer>.comfy_quant` (a uint8 JSON blob) or in the safetensors metadata
  `_quantization_metadata = {"layers": {"<layer>": {"format": ...}}}`.

In both scaled forms `W = weight.float() * scale` (a scalar, or one scale per output row). Only the fp8
formats `float8_e4m3fn` / `float8_e5m2` are handled; any other (nvfp4, mxfp8, int8_*, ...) is refused with
the layer named. Input scales are dropped: they only matter for fp8 matmul, never for the weight values.

`QuantView(source)` (or `logical_weights(source)`) wraps an opened file and exposes only the logical
tensors, dequantized lazily one at a time; `.report` says what was applied and dropped.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..common.errors import BadInput

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FP8_DTYPES = {dt: name for name, dt in FP8_FORMATS.items()}
MARKER = "scaled_fp8"
QUANT_METADATA = "_quantization_metadata"
# key suffix -> role. A layer's keys are `<layer><suffix>`; its weight is `<layer>.weight`.
SUFFIXES = {
    ".scale_weight": "scale_weight", ".scale_input": "scale_input",
    ".weight_scale": "weight_scale", ".input_scale": "input_scale", ".comfy_quant": "comfy_quant",
    ".weight_scale_2": "weight_scale_2", ".pre_quant_scale": "pre_quant_scale",
}
INPUT_SCALES_NOTE = "input scales dropped (they only matter for fp8 matmul)"


@dataclass
class ScaledLayer:
    layer: str
    weight: str
    scale: str | None  # the key of scale_weight / weight_scale (None: a plain cast)
    fmt: str | None
    per_row: bool  # scale of shape (out,) or (out, 1) rather than a scalar


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, per_row: bool = False):
    """(q, scale) with `scale = amax(|W|) / finfo(dtype).max` (float32: 0-dim, or (out, 1) per row)."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"{dtype} is not an fp8 dtype")
    w = w.detach().to(torch.float32)
    fmax = torch.finfo(dtype).max
    if per_row:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).reshape(w.shape[0], *([1] * (w.ndim - 1)))
    else:
        amax = w.abs().amax() if w.numel() else torch.zeros(())
    scale = amax / fmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (w / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale


def logical_weights(source, dtype: torch.dtype | None = None, keep_fp8: bool = False) -> "QuantView":
    """The logical tensors of an opened file (a `QuantView`; an existing view is returned as is)."""
    if isinstance(source, QuantView):
        return source
    return QuantView(source, dtype=dtype, keep_fp8=keep_fp8)


class QuantView(Mapping):
    """Read-only mapping of an opened weights file's logical tensors.

    Scaled fp8 layers come back as `weight.float() * scale` in `dtype` (default float32, which is exact);
    plain fp8 tensors as a cast to `dtype` (default bfloat16, exact), or untouched with `keep_fp8=True`
    (the loader then upcasts on compute); other tensors untouched. Marker, scale, input-scale and
    `comfy_quant` keys are not listed. `scaled(name)` gives `(stored weight, scale or None)` instead,
    the scale shaped to broadcast against the weight. `.report` (JSON-able) and `.storage_dtypes`
    say what the file held and what was done.
    """

    def __init__(self, source, dtype: torch.dtype | None = None, keep_fp8: bool = False):
        self.source = source
        self.keep_fp8 = keep_fp8
        self._dtype = dtype
        self._layers: dict[str, ScaledLayer] = {}  # weight key -> layer
        self._hidden: set[str] = set()
        self.report: dict = {}
        self._analyse()
        self._keys = [k for k in source.keys() if k not in self._hidden]

    # ---------------------------------------------------------------------------------- analysis
    def _bad(self, cause):
        return BadInput(getattr(self.source, "path", "<weights>"), cause)

    def _metadata_formats(self, keyset) -> dict[str, dict]:
        raw = (getattr(self.source, "metadata", None) or {}).get(QUANT_METADATA)
        if raw is None:
            return {}
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise self._bad(f"corrupt {QUANT_METADATA} metadata: {exc}") from None
        layers = meta.get("layers") if isinstance(meta, dict) else None
        if not isinstance(layers, dict):
            raise self._bad(f"corrupt {QUANT_METADATA} metadata: no \"layers\" object")
        out = {}
        for name, conf in layers.items():
            if not isinstance(conf, dict):
                raise self._bad(f"corrupt {QUANT_METADATA} metadata: layer {name} is not an object")
            out[self._resolve_layer(name, keyset)] = conf
        return out

    @staticmethod
    def _resolve_layer(name: str, keyset) -> str:
        """The layer a metadata name means: itself, or the one key prefix that ends with it."""
        if f"{name}.weight" in keyset:
            return name
        tail = f".{name}.weight"
        found = [k[: -len(".weight")] for k in keyset if k.endswith(tail)]
        return found[0] if len(found) == 1 else name

    def _comfy_quant(self, layer: str, key: str) -> dict:
        t = self.source[key]
        try:
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.uint8, torch.int8):
                raise ValueError("not a uint8 tensor")
            conf = json.loads(bytes(t.reshape(-1).view(torch.uint8).tolist()).decode("utf-8"))
            if not isinstance(conf, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:
            raise self._bad(f"layer {layer}: corrupt comfy_quant blob ({exc})") from None
        return conf

    def _analyse(self):
        src = self.source
        keys = list(src.keys())
        keyset = set(keys)
        markers = [k for k in keys if k == MARKER or k.endswith("." + MARKER)]
        roles: dict[str, dict[str, str]] = {}
        for k in keys:
            for suffix, role in SUFFIXES.items():
                if k.endswith(suffix) and len(k) > len(suffix):
                    roles.setdefault(k[: -len(suffix)], {})[role] = k
                    break
        meta_formats = self._metadata_formats(keyset)
        for layer in meta_formats:
            roles.setdefault(layer, {})

        applied = Counter()
        dropped_inputs, dropped_blobs, orphans = 0, 0, []
        full_precision = any(src.shape(m).numel() == 2 for m in markers)
        for layer, role in roles.items():
            conf = self._comfy_quant(layer, role["comfy_quant"]) if "comfy_quant" in role else \
                meta_formats.get(layer)
            fmt = conf.get("format") if conf else None
            if conf is not None and not isinstance(fmt, str):
                raise self._bad(f"layer {layer}: quantization config without a format: {conf}")
            if conf and conf.get("full_precision_matrix_mult"):
                full_precision = True
            if fmt is not None and fmt not in FP8_FORMATS:
                raise self._bad(f"layer {layer}: quantization format {fmt!r} is not supported "
                                f"(only scaled {' / '.join(FP8_FORMATS)} weights are)")
            weight = f"{layer}.weight"
            wdt = src.dtype(weight) if weight in keyset else None
            # Quantization keys only where the file says so (a format, a marker) or the storage shows it:
            # a name like `x.input_scale` in an unquantized model is left alone.
            if not (conf is not None or wdt in FP8_DTYPES or (markers and "scale_weight" in role)
                    or (wdt in (torch.uint8, torch.int8) and len(role) > 0)):
                continue
            extra = [r for r in ("weight_scale_2", "pre_quant_scale") if r in role]
            if extra:
                raise self._bad(f"layer {layer}: {', '.join(extra)} belongs to a quantization format that "
                                f"is not supported (only scaled {' / '.join(FP8_FORMATS)} weights are)")
            self._hidden.update(role.values())
            dropped_inputs += sum(r in role for r in ("scale_input", "input_scale"))
            dropped_blobs += "comfy_quant" in role
            scale = role.get("scale_weight") or role.get("weight_scale")
            if wdt is None:
                orphans += [k for r, k in role.items()]
                continue
            wname = src.dtype_name(weight)
            if fmt is None and scale is not None and wdt not in FP8_DTYPES and "scale_weight" not in role:
                raise self._bad(f"layer {layer}: weight stored as {wname} with a weight_scale but no "
                                "format: this quantization format is not supported")
            if fmt is not None and FP8_FORMATS[fmt] != wdt:
                raise self._bad(f"layer {layer}: format {fmt} but the weight is stored as {wname}")
            if scale is None:  # a format but no scale: the weight is a plain cast
                continue
            per_row = self._check_scale(layer, weight, scale)
            self._layers[weight] = ScaledLayer(layer, weight, scale, fmt or FP8_DTYPES.get(wdt), per_row)
            applied["scale_weight" if "scale_weight" in role else "weight_scale"] += 1
        self._hidden.update(markers)

        fp8_plain = sum(1 for k in keys if k not in self._hidden and k not in self._layers
                        and src.dtype(k) in FP8_DTYPES)
        if markers or applied["scale_weight"]:
            scheme = "scaled_fp8"
        elif applied or dropped_blobs or meta_formats:
            scheme = "comfy_quant"
        elif fp8_plain:
            scheme = "fp8"
        else:
            scheme = "none"
        notes = []
        if markers:
            notes.append(f"scaled_fp8 marker dropped ({', '.join(markers)})")
        if applied["scale_weight"]:
            notes.append(f"{applied['scale_weight']} scale_weight keys applied: W = weight.float() * scale_weight")
        if applied["weight_scale"]:
            notes.append(f"{applied['weight_scale']} weight_scale keys applied: W = weight.float() * weight_scale")
        if dropped_inputs:
            notes.append(f"{dropped_inputs} {INPUT_SCALES_NOTE}")
        if dropped_blobs:
            notes.append(f"{dropped_blobs} comfy_quant blobs dropped")
        if orphans:
            notes.append(f"{len(orphans)} scale keys without a weight dropped: {', '.join(orphans[:4])}"
                         + (" ..." if len(orphans) > 4 else ""))
        if fp8_plain:
            what = "kept as fp8 (upcast on compute)" if self.keep_fp8 else \
                f"cast to {str(self._dtype or torch.bfloat16).replace('torch.', '')}"
            notes.append(f"{fp8_plain} unscaled fp8 tensors {what}")
        self.report = {
            "scheme": scheme,
            "dequantized": len(self._layers),
            "dequantized_dtype": str(self._dtype or torch.float32).replace("torch.", "") if self._layers else None,
            "scale_weight_applied": applied["scale_weight"],
            "weight_scale_applied": applied["weight_scale"],
            "fp8_unscaled": fp8_plain,
            "fp8_kept": self.keep_fp8 and fp8_plain > 0,
            "dropped": {"markers": markers, "input_scales": dropped_inputs, "comfy_quant": dropped_blobs,
                        "orphan_scales": orphans},
            "full_precision_matrix_mult": full_precision,
            "notes": notes,
        }

    def _check_scale(self, layer: str, weight: str, scale: str) -> bool:
        """True for one scale per output row, False for a scalar; anything else is refused."""
        s, w = tuple(self.source.shape(scale)), tuple(self.source.shape(weight))
        n = 1
        for d in s:
            n *= d
        if n == 1:
            return False
        if w and (s == (w[0],) or s == (w[0], 1)):
            return True
        raise self._bad(f"layer {layer}: scale of shape {list(s)} does not fit the weight of shape {list(w)} "
                        "(block scales are not supported)")

    # ---------------------------------------------------------------------------------- mapping
    def _scale(self, layer: ScaledLayer) -> torch.Tensor:
        s = self.source[layer.scale].to(torch.float32)
        w_ndim = len(self.source.shape(layer.weight))
        if layer.per_row:
            return s.reshape(s.shape[0], *([1] * (w_ndim - 1)))
        return s.reshape(())

    def __getitem__(self, name: str):
        if name in self._hidden:
            raise KeyError(name)
        layer = self._layers.get(name)
        if layer is not None:
            w = self.source[name]
            return (w.to(torch.float32) * self._scale(layer)).to(self._dtype or torch.float32)
        t = self.source[name]
        if isinstance(t, torch.Tensor) and t.dtype in FP8_DTYPES and not self.keep_fp8:
            return t.to(self._dtype or torch.bfloat16)
        return t

    def scaled(self, name: str) -> tuple[object, torch.Tensor | None]:
        """(the stored tensor, its scale broadcastable against it) for a scaled layer's weight;
        (the logical tensor, None) for anything else."""
        if name in self._hidden:
            raise KeyError(name)
        layer = self._layers.get(name)
        if layer is None:
            return self[name], None
        return self.source[name], self._scale(layer)

    def extent(self, name: str):
        """The file bytes of a tensor passed through unchanged; None for one that is computed."""
        if name in self._hidden or name in self._layers or not hasattr(self.source, "extent"):
            return None
        if self.source.dtype(name) in FP8_DTYPES and not self.keep_fp8:
            return None
        return self.source.extent(name)

    def is_scaled(self, name: str) -> bool:
        return name in self._layers

    def maps(self, t) -> bool:
        """Whether `t` is a zero-copy view of the file (see `WeightFile.maps`)."""
        return hasattr(self.source, "maps") and self.source.maps(t)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, name):
        return name not in self._hidden and name in self.source

    def shape(self, name: str) -> torch.Size:
        if name in self._hidden:
            raise KeyError(name)
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `self[name]` has."""
        if name in self._hidden:
            raise KeyError(name)
        if name in self._layers:
            return self._dtype or torch.float32
        dt = self.source.dtype(name)
        if dt in FP8_DTYPES and not self.keep_fp8:
            return self._dtype or torch.bfloat16
        return dt

    def dtype_name(self, name: str) -> str:
        """The storage dtype name in the file."""
        if name in self._hidden:
            raise KeyError(name)
        return self.source.dtype_name(name)

    def dtypes(self) -> Counter:
        """Counter of the logical dtypes (as torch names without the `torch.` prefix)."""
        return Counter(str(self.dtype(k)).replace("torch.", "") for k in self._keys)

    @property
    def storage_dtypes(self) -> Counter:
        return self.source.dtypes()

    @property
    def path(self):
        return self.source.path

    @property
    def metadata(self):
        return self.source.metadata

    @property
    def config(self):
        return getattr(self.source, "config", None)

    @property
    def nbytes(self):
        return self.source.nbytes

    def close(self):
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"QuantView({self.source!r}, scheme={self.report.get('scheme')!r})"
