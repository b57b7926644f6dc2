"""Every Flux LoRA format → one canonical form: a list of `Part`s.

A key is read as `<prefix><module><suffix>`:

* the *suffix* says which tensor of which adapter kind it is (`.lora_down.weight` = A, `.lora_B.bias`,
  `.alpha`, `.hada_w1_a`, `.lokr_w2`, `.diff_b`, `.dora_scale`, ...; PEFT adapter names such as
  `.lora_A.default.weight` are dropped first);
* the *prefix* says the model family and how module names are written (`lora_unet_` = Flux BFL names with
  `_` for `.`, `transformer.` = diffusers names, `text_encoders.clip_l.transformer.` = CLIP-L, ...);
* the *module* is looked up in the family's layout table (`families/<family>.py`): dotted names directly
  with `Table.match`, underscored names (kohya, OneTrainer, LyCORIS) against the table's templates with
  `_` in place of `.`, so a dotted name is recovered, never guessed from underscores. A few aliases that no
  table holds (XLabs `processor.qkv_lora1`, ComfyUI USO `linear1_qkv`) are listed below.

Keys of one module are grouped and become one `Part` per adapter kind. Parts keep the naming side they
were found in (side "a" = BFL / original names, side "b" = diffusers / transformers names); fused BFL
modules stay fused (`double_blocks.0.img_attn.qkv`). A part known to cover only some rows of a fused module
(OMI `qkv.1`, XLabs single-block `qkv_lora` = q, k, v of `linear1`) is turned into side-b parts at once,
since that is exact (A shared, B sliced by rows).

Keys that fit no rule are listed in `Lora.not_placed` with the reason. A file with nothing for Flux in it
(an SD1.5 or SDXL LoRA) is refused with `BadInput`.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ...common.errors import BadInput
from ..table import A, B, Split

FLUX, CLIP, T5 = "flux-transformer", "clip-l", "t5-xxl"
TEXT_FAMILIES = (CLIP, T5)
KINDS = ("lora", "loha", "lokr", "full", "set", "reshape")
# Elements of one module's weight delta: FLUX.1's largest layer has 66M, T5-XXL's embedding 132M. LoRA, LoHa
# and LoKr factors are small, their product is not: a larger delta is refused before anything multiplies.
MAX_DELTA = 2 ** 28
MAX_PATTERN = 256  # characters of one PEFT alpha_pattern key (a regular expression)


def family_module(name: str):
    """The family module (`families/flux.py`, ...) of a family name."""
    from ..families import FAMILIES
    return FAMILIES[name]


# ---------------------------------------------------------------------------------------- canonical

@dataclass
class Part:
    """One adapter on one module, in the naming of the side it was found in.

    kind / tensors:
      lora    down [r, in], up [out, r], optional up_bias [out]       ΔW = scale·up@down, Δb = scale·up_bias
      loha    hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b              ΔW = scale·(w1a@w1b)⊙(w2a@w2b)
      lokr    lokr_w1 | lokr_w1_a+lokr_w1_b, lokr_w2 | lokr_w2_a+_b    ΔW = scale·kron(w1, w2)
      full    diff [out, in] and/or diff_b [out]                      ΔW = diff, Δb = diff_b
      set     value                                                   the tensor is replaced (control norms)
      reshape shape (1-D ints)                                        input expansion (ComfyUI reshape_weight)
    DoRA: lora/loha/lokr may carry `dora_scale` ([1, in]: LyCORIS/kohya axis, or [out, 1]) or `magnitude`
    ([out]: PEFT `lora_magnitude_vector`).
    `module` is a module name (a tensor name for `set`); `scale` multiplies the product (alpha/rank,
    alpha/sqrt(rank) for rsLoRA, or 1 when the format has no alpha).
    """

    family: str
    side: str
    module: str
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    rank: int | None = None
    scale: float = 1.0
    keys: tuple[str, ...] = ()
    label: str = ""
    convention: str = "1"  # how scale was found: "alpha/rank", "alpha/sqrt(rank)" (rsLoRA) or "1"

    @property
    def key(self) -> str:
        """The name reports give this part by: its first key in the file (its module when it has none)."""
        return self.keys[0] if self.keys else self.module

    @property
    def dora(self) -> torch.Tensor | None:
        return self.tensors.get("dora_scale", self.tensors.get("magnitude"))

    @property
    def has_bias(self) -> bool:
        return "up_bias" in self.tensors or "diff_b" in self.tensors

    @property
    def has_weight(self) -> bool:
        return self.kind in ("lora", "loha", "lokr") or "diff" in self.tensors

    @property
    def shape(self) -> tuple[int, int] | None:
        """(out, in) of ΔW, from the tensors alone; None for bias-only / set / reshape parts."""
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0], t["down"].shape[1]
        if self.kind == "loha":
            return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
        if self.kind == "lokr":
            f1, f2 = lokr_factor(t, "1"), lokr_factor(t, "2")
            return f1[0].shape[0] * f2[0].shape[0], f1[-1].shape[1] * f2[-1].shape[1]
        if self.kind == "full" and "diff" in t and t["diff"].dim() == 2:
            return tuple(t["diff"].shape)
        return None  # bias-only, set, reshape, or a 1-D difference (a norm weight)

    @property
    def out_features(self) -> int | None:
        if self.shape is not None:
            return self.shape[0]
        t = self.tensors
        if "diff" in t:
            return t["diff"].shape[0]
        if "diff_b" in t:
            return t["diff_b"].shape[0]
        if "up_bias" in t:
            return t["up_bias"].shape[0]
        return None


def lokr_factor(t, i: str) -> tuple:
    """The tensors whose product is LoKr factor `i` ("1" or "2"): the whole factor, or its two halves."""
    if f"lokr_w{i}" in t:
        return (t[f"lokr_w{i}"],)
    return t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]


@dataclass
class Lora:
    """A parsed LoRA file: canonical parts, keys that fit nowhere, and what the file was."""

    path: str
    parts: list[Part]
    not_placed: list[dict]
    format: str
    formats: dict[str, int]
    metadata: dict = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    scale_convention: str = "1"
    identity: tuple | None = None  # what the file was when read (path, size, mtime), set by the loader's cache

    def family_parts(self, family: str) -> list[Part]:
        return [p for p in self.parts if p.family == family]

    @property
    def name(self) -> str:
        return Path(self.path).name

    def zero_filled(self, family: str = FLUX) -> list[dict]:
        """Fused modules this LoRA covers only in part: the missing parts get a zero delta."""
        table = family_module(family).TABLE
        seen: dict[tuple, tuple] = {}
        for p in self.family_parts(family):
            if p.side != B or p.kind in ("set", "reshape"):
                continue
            m = table.match(p.module, B)
            if m is None or m.rest or not isinstance(m.rule.op, Split):
                continue
            key = (id(m.rule), tuple(sorted(m.values.items())))
            seen.setdefault(key, (m, set()))[1].add(m.part)
        out = []
        for m, present in seen.values():
            n = len(m.rule.b)
            missing = [m.rule.b[k].format(**m.values) for k in range(n) if k not in present]
            if missing:
                out.append({"module": m.rule.a.format(**m.values), "missing": missing})
        return out

    @property
    def report(self) -> dict:
        """JSON-able description (what `fluxbridge lora inspect` prints)."""
        families = Counter(p.family for p in self.parts)
        kinds = Counter(p.kind for p in self.parts)
        ranks = Counter(p.rank for p in self.parts if p.rank is not None)
        alphas = Counter(_num(p.alpha) for p in self.parts if p.alpha is not None)
        text = [p for p in self.parts if p.family in TEXT_FAMILIES]
        return {
            "path": self.path,
            "format": self.format,
            "formats": dict(self.formats),
            "families": dict(families),
            "kinds": dict(kinds),
            "dora": any(p.dora is not None for p in self.parts),
            "scale": self.scale_convention,
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "alphas": {str(k): v for k, v in sorted(alphas.items(), key=lambda kv: float(kv[0]))},
            "parts": len(self.parts),
            "text_encoder_parts": {f: sum(1 for p in text if p.family == f) for f in TEXT_FAMILIES
                                   if any(p.family == f for p in text)},
            "zero_filled": self.zero_filled(FLUX),
            "not_placed": list(self.not_placed),
            "dtypes": dict(self.dtypes),
        }


def _num(x: float):
    return int(x) if float(x).is_integer() else round(float(x), 6)


# -------------------------------------------------------------------------------------- key grammar

# (suffix, role). Longest suffix wins. Roles: down/up/up_bias (LoRA), alpha, dora_scale, magnitude,
# hada_*/lokr_* (LyCORIS), diff/diff_b (full), value (set), shape (reshape), conv (Tucker / mid: conv only).
_SUFFIXES = sorted([
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_up.bias", "up_bias"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),  # XLabs processors
    (".alpha", "alpha"), (".dora_scale", "dora_scale"),
    (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "conv"), (".hada_t2", "conv"),
    (".lokr_w1", "lokr_w1"), (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_t2", "conv"),
    (".lora_mid.weight", "conv"),
    (".diff", "diff"), (".diff_b", "diff_b"), (".w_norm", "diff"), (".b_norm", "diff_b"),
    (".set_weight", "value"), (".reshape_weight", "shape"),
], key=lambda s: -len(s[0]))
_UNSUPPORTED_SUFFIX = re.compile(r"\.(oft_blocks|oft_diag|oft_R|a1\.weight|a2\.weight|b1\.weight|b2\.weight"
                                 r"|on_input|weight_ia3|ia3_l|boft_R|boft_s|vector_z)$")
_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.(?!weight$|bias$)[^.]+\.(weight|bias)$")
# Which naming "style" a role's suffix belongs to, for the format label.
_STYLE = {".lora_down.weight": "kohya", ".lora_up.weight": "kohya", ".lora_A.weight": "peft",
          ".lora_B.weight": "peft", ".lora_B.bias": "peft", ".lora.down.weight": "legacy",
          ".lora.up.weight": "legacy", ".down.weight": "xlabs", ".up.weight": "xlabs"}


@dataclass(frozen=True)
class _Prefix:
    prefix: str
    family: str
    underscored: bool
    sides: tuple[str, ...]
    label: str


_PREFIXES = sorted([
    _Prefix("lora_unet_", FLUX, True, (A, B), "kohya"),
    _Prefix("lora_transformer_", FLUX, True, (B, A), "onetrainer"),
    _Prefix("lycoris_", FLUX, True, (B, A), "lycoris"),
    _Prefix("lora_te1_", CLIP, True, (A, B), "kohya"),
    _Prefix("lora_te_", CLIP, True, (A, B), "kohya"),
    _Prefix("lora_te2_", T5, True, (A, B), "kohya"),
    _Prefix("lora_te3_", T5, True, (A, B), "kohya"),
    _Prefix("text_encoders.clip_l.transformer.", CLIP, False, (A, B), "comfy"),
    _Prefix("text_encoders.t5xxl.transformer.", T5, False, (A, B), "comfy"),
    _Prefix("text_encoder.", CLIP, False, (A, B), "diffusers"),
    _Prefix("text_encoder_2.", T5, False, (A, B), "diffusers"),
    _Prefix("clip_l.", CLIP, False, (A, B), "omi"),
    _Prefix("t5.", T5, False, (A, B), "omi"),
    _Prefix("transformer.base_model.model.", FLUX, False, (B, A), "peft"),
    _Prefix("base_model.model.transformer.", FLUX, False, (B, A), "peft"),
    _Prefix("base_model.model.", FLUX, False, (B, A), "peft"),
    _Prefix("model.diffusion_model.", FLUX, False, (A, B), "comfy"),
    _Prefix("diffusion_model.", FLUX, False, (A, B), "comfy"),
    _Prefix("transformer.", FLUX, False, (B, A), "diffusers"),
    _Prefix("", FLUX, False, (A, B), "bfl"),
], key=lambda p: -len(p.prefix))

# Modules no layout table holds: (pattern on the dotted stem, BFL module, rows covered as parts of it).
_ALIASES = (
    (re.compile(r"double_blocks\.(\d+)\.processor\.qkv_lora1"), "double_blocks.{}.img_attn.qkv", None),
    (re.compile(r"double_blocks\.(\d+)\.processor\.qkv_lora2"), "double_blocks.{}.txt_attn.qkv", None),
    (re.compile(r"double_blocks\.(\d+)\.processor\.proj_lora1"), "double_blocks.{}.img_attn.proj", None),
    (re.compile(r"double_blocks\.(\d+)\.processor\.proj_lora2"), "double_blocks.{}.txt_attn.proj", None),
    (re.compile(r"single_blocks\.(\d+)\.processor\.qkv_lora"), "single_blocks.{}.linear1", (0, 1, 2)),
    (re.compile(r"single_blocks\.(\d+)\.processor\.proj_lora"), "single_blocks.{}.linear2", None),
    (re.compile(r"single_blocks\.(\d+)\.linear1_qkv"), "single_blocks.{}.linear1", (0, 1, 2)),
)

# Module names of other architectures: the reason given for keys that carry them.
_OTHER_ARCH = (
    (re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block)([._]|$)"), "SD1.5/SDXL UNet (diffusers names)"),
    (re.compile(r"(^|[._])(input_blocks|output_blocks|middle_block)([._]|$)"), "SD1.5/SDXL UNet (LDM names)"),
    (re.compile(r"(^|[._])joint_blocks([._]|$)"), "SD3"),
    (re.compile(r"distilled_guidance_layer"), "Chroma"),
    (re.compile(r"(double|single)_stream_modulation"), "FLUX.2"),
    (re.compile(r"^lora_te2_text_model|^text_encoder_2\.text_model"), "SDXL text encoder 2 (CLIP-G)"),
)


@dataclass(frozen=True)
class _Loc:
    family: str
    side: str
    module: str
    covers: tuple[int, ...] | None  # part indices of a fused side-a module that the rows cover
    label: str
    prefix: str


def _underscored_patterns(family: str, side: str):
    key = (family, side)
    if key not in _UNDERSCORED:
        pats = []
        for rule in family_module(family).TABLE.rules:
            for part, template in enumerate(rule.templates(side)):
                rx, pos = "", 0
                for m in re.finditer(r"\{(\w+)\}", template):
                    rx += re.escape(template[pos:m.start()].replace(".", "_")) + rf"(?P<{m.group(1)}>\d+)"
                    pos = m.end()
                rx += re.escape(template[pos:].replace(".", "_"))
                literal = len(re.sub(r"\{\w+\}", "", template))
                pats.append((literal, re.compile(rx), rule, part))
        pats.sort(key=lambda p: -p[0])
        _UNDERSCORED[key] = pats
    return _UNDERSCORED[key]


_UNDERSCORED: dict = {}


_FULL_WEIGHT = "a full model weight, not a LoRA tensor"


def _resolve(stem: str, is_tensor: bool) -> _Loc | str:
    """Where a key's stem points, or the reason it points nowhere."""
    reason = "unknown module"
    for pre in _PREFIXES:
        if not stem.startswith(pre.prefix):
            continue
        rest = stem[len(pre.prefix):]
        if not rest:
            continue
        if pre.underscored:
            rest = rest.rstrip("_")  # SimpleTuner 2024 wrote a trailing "_" (F14)
            for side in pre.sides:
                for _, rx, rule, part in _underscored_patterns(pre.family, side):
                    m = rx.fullmatch(rest)
                    if m:
                        values = {k: int(v) for k, v in m.groupdict().items()}
                        name = rule.templates(side)[part].format(**values)
                        return _Loc(pre.family, side, name, None, pre.label, pre.prefix)
            continue
        if pre.family == FLUX:
            for rx, target, covers in _ALIASES:
                m = rx.fullmatch(rest)
                if m:
                    label = "xlabs" if "processor" in rest else "comfy-uso"
                    return _Loc(FLUX, A, target.format(m.group(1)), covers, label, pre.prefix)
        table = family_module(pre.family).TABLE
        for side in pre.sides:
            m = table.match(rest, side)
            if m is None:
                continue
            name = rule_name(m.rule, side, m.part, m.values)
            if not m.rest and (not is_tensor or _is_norm_tensor(name)):
                return _Loc(pre.family, side, name, None, pre.label, pre.prefix)
            if (m.rest.isdigit() and side == A and isinstance(m.rule.op, Split)
                    and int(m.rest) < len(m.rule.b) and not is_tensor):
                return _Loc(pre.family, A, name, (int(m.rest),), "omi", pre.prefix)
            if m.rest and is_tensor and m.rest in ("weight", "bias"):
                reason = _FULL_WEIGHT
            elif m.rest:
                reason = f"unknown sub-module {m.rest!r} of {name}"
    for rx, arch in _OTHER_ARCH:
        if rx.search(stem):
            return f"wrong architecture ({arch})"
    return reason


def rule_name(rule, side: str, part: int, values: Mapping) -> str:
    return rule.templates(side)[part].format(**values)


def _is_norm_tensor(name: str) -> bool:
    last = name.rsplit(".", 2)
    return name.endswith(".scale") or (name.endswith(".weight") and "norm" in last[-2])


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(stem, role, style) of a key; None when no known suffix ends it."""
    key = _ADAPTER_NAME.sub(lambda m: f".{m.group(1)}.{m.group(2)}", key)
    key = re.sub(r"\.lora_magnitude_vector\.weight$", ".lora_magnitude_vector", key)
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role, _STYLE.get(suffix, "lycoris" if role.startswith(
                ("hada", "lokr", "diff")) else "")
    return None


def looks_like_lora(keys) -> bool:
    """Whether tensor names are a LoRA's: at least half end in a LoRA / LyCORIS suffix. (A layout table
    places `double_blocks.0.img_attn.qkv.lora_A.weight` like a weight, so model detection should ask
    this first.)"""
    keys = list(keys)
    return bool(keys) and sum(1 for k in keys if _split_key(k) is not None) * 2 >= len(keys)


# --------------------------------------------------------------------------------------------- parse

def load_lora(source, metadata: Mapping[str, str] | None = None, name: str | None = None) -> Lora:
    """Parse a LoRA: a path (safetensors file or a folder holding one) or a mapping name -> tensor."""
    from .source import read_lora
    if isinstance(source, Lora):
        return source
    if isinstance(source, Mapping):
        tensors, meta, path = dict(source), dict(metadata or {}), str(name or "<state dict>")
        if not tensors:
            raise BadInput(path, "no tensors in it: not a LoRA")
    else:
        tensors, meta = read_lora(source)
        path = str(source)
    return parse(tensors, meta, path)


def parse(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str) -> Lora:
    _check_values(tensors, path)
    peft_configs = _peft_configs(metadata)
    _check_peft_configs(peft_configs, path)
    software = _software(metadata)

    groups: dict[_Loc, dict[str, tuple[str, torch.Tensor]]] = {}
    styles: dict[_Loc, Counter] = {}
    not_placed: list[dict] = []
    for key in sorted(tensors):
        t = tensors[key]
        split = _split_key(key)
        if split is None:
            if _UNSUPPORTED_SUFFIX.search(key):
                not_placed.append({"key": key, "reason": "unsupported adapter type (OFT/BOFT/GLoRA/IA3)"})
                continue
            stem, role, style = key, "value", "set"
            loc = _resolve(key, is_tensor=True)
        elif split[1] == "value":  # ComfyUI `<module>.set_weight` / `<tensor>.set_weight`: a norm scale / weight
            stem, role, style = split
            loc = _resolve(stem + ".scale", is_tensor=True)
            if not isinstance(loc, _Loc):
                loc = _resolve(stem + ".weight", is_tensor=True)
            if not isinstance(loc, _Loc):  # ComfyUI's BFL-control conversion names the tensor itself
                loc = _resolve(stem, is_tensor=True)
        else:
            stem, role, style = split
            loc = _resolve(stem, is_tensor=False)
        if not isinstance(loc, _Loc):
            not_placed.append({"key": key, "reason": loc})
            continue
        if role == "conv":
            not_placed.append({"key": key, "reason": "convolution-only tensor: Flux, CLIP and T5 layers are Linear"})
            continue
        group = groups.setdefault(loc, {})
        if role in group:
            not_placed.append({"key": key, "reason": f"duplicate: {group[role][0]} gives the same tensor"})
            continue
        group[role] = (key, t)
        styles.setdefault(loc, Counter())[style] += 1

    parts: list[Part] = []
    broken: list[dict] = []  # adapters found in their place whose tensors do not fit together
    labels: Counter = Counter()
    control = any(r == "value" for g in groups.values() for r in g) or any(
        "up_bias" in g for loc, g in groups.items() if loc.prefix == "")
    for loc, group in groups.items():
        label = _label(loc, styles[loc], control, software)
        made, refused = _make_parts(loc, group, peft_configs, label)
        broken += refused
        for p in made:
            parts += _expand_covers(p, loc, not_placed)
        if made and loc.family == FLUX:
            labels[label] += sum(len(p.keys) for p in made)
    not_placed += broken

    from .siblings import check_siblings
    parts, mismatched = check_siblings(parts)
    not_placed += mismatched

    weights = [d["key"] for d in not_placed if d["reason"] == _FULL_WEIGHT]
    flux_parts = [p for p in parts if p.family == FLUX]
    if (weights or not flux_parts) and not looks_like_lora(tensors):
        # model weights given as a LoRA (their norms would read as `set`), or no LoRA at all
        raise BadInput(path, _not_a_lora(tensors, metadata))
    if not flux_parts:
        foreign = [d["key"] for d in not_placed if d["reason"].startswith("wrong architecture")]
        if foreign or not parts:
            if broken and not foreign:  # a Flux (or text-encoder) LoRA, but none of its adapters is usable
                more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
                raise BadInput(path, f"a broken LoRA: none of its adapters can be used: {broken[0]['key']}: "
                                     f"{broken[0]['reason']}{more}")
            sample = foreign[:3] or sorted(tensors)[:3]
            why = f" ({not_placed[0]['reason']})" if not foreign and not_placed else ""
            raise BadInput(path, f"not a Flux LoRA: {', '.join(sample)}{why}")
    fmt = labels.most_common(1)[0][0] if labels else _text_label(parts)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in tensors.values())
    conventions = {p.convention for p in parts if p.kind in ("lora", "loha", "lokr")}
    scaled = sorted(conventions - {"1"})
    convention = (scaled[0] if len(scaled) == 1 else " or ".join(scaled) if scaled else "1") + (
        ", 1 where the file has no alpha" if scaled and "1" in conventions else "")
    return Lora(path, parts, not_placed, fmt, dict(labels), dict(metadata), dict(dtypes), convention)


def _not_a_lora(tensors: Mapping, metadata: Mapping) -> str:
    """Why a file without LoRA tensors is refused, saying what it holds instead."""
    from ..detect import components, what_it_holds
    held = what_it_holds(tensors, metadata)
    if components(tensors, min_keys=1):
        return f"not a LoRA but model weights: {held}; load it with a model loader"
    return f"neither a LoRA nor model weights FluxBridge knows: {held}"


def _text_label(parts) -> str:
    return next((p.label for p in parts), "unknown")


def _check_values(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise BadInput(path, f"{key} is not a tensor")
        if t.is_floating_point() and t.numel():
            v = t if t.dtype.itemsize > 1 else t.float()
            if not bool(torch.isfinite(v).all()):
                raise BadInput(path, f"tensor {key} holds NaN or infinite values")


def _label(loc: _Loc, styles: Counter, control: bool, software: str) -> str:
    style = styles.most_common(1)[0][0] if styles else ""
    base = loc.label
    if loc.family != FLUX:
        return base
    if base in ("xlabs", "comfy-uso", "omi"):
        return base
    if base == "comfy":
        return "bfl-peft" if style == "peft" else "comfy"
    if base == "kohya":
        return "kohya" if loc.side == A else "kohya-diffusers-names"
    if base == "diffusers":
        if loc.side == A:
            return "omi"
        if software == "ai-toolkit":
            return "ai-toolkit"
        return {"legacy": "diffusers-legacy", "kohya": "diffusers-kohya-suffixes"}.get(style, "diffusers")
    if base == "peft":
        if loc.prefix == "transformer.base_model.model.":
            return "simpletuner-broken"
        return "fal-kontext" if loc.side == A else "peft"
    if base == "bfl":
        if loc.side == B:
            return "peft"
        if style == "xlabs":
            return "xlabs"
        return "bfl-control" if control else "bfl"
    return base


def _software(metadata: Mapping[str, str]) -> str:
    raw = metadata.get("software")
    if not raw:
        return ""
    try:
        data = json.loads(raw)
    except ValueError:
        return str(raw)
    return str(data.get("name", "")) if isinstance(data, dict) else str(data)


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """LoraConfig dicts per component prefix ("transformer", "text_encoder", "" for a whole-model config)."""
    out: dict[str, dict] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for k, v in data.items():
                comp, _, field_ = k.partition(".")
                if field_:
                    out.setdefault(comp, {})[field_] = v
                else:
                    out.setdefault("", {})[k] = v
    cfg = metadata.get("_adapter_config")  # adapter_config.json next to a PEFT adapter_model.safetensors
    if cfg:
        try:
            data = json.loads(cfg)
        except ValueError:
            data = None
        if isinstance(data, dict):
            out.setdefault("", {}).update(data)
    return out


_COMPONENT = {"transformer.": "transformer", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}


def _peft_config_for(loc_or_part, configs: dict) -> dict | None:
    prefix = getattr(loc_or_part, "prefix", None)
    comp = _COMPONENT.get(prefix or "")
    if comp and comp in configs:
        return configs[comp]
    return configs.get("")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pattern_problem(key) -> str | None:
    """Why a PEFT pattern key may not be matched (None when it may). PEFT matches the keys with `re`, whose
    backtracking takes exponential time on a repeated group (`(a|aa)+`, `(.*)*`) and high polynomial time on
    many repetitions: at most one repetition (`*`, `+`, `{}`), never of a group, and two `?` or `|`."""
    if not isinstance(key, str):
        return "not a string"
    if len(key) > MAX_PATTERN:
        return f"longer than {MAX_PATTERN} characters"
    reps = opts = 0
    prev, i, in_class = "", 0, False
    while i < len(key):
        c = key[i]
        if c == "\\":
            prev, i = "x", i + 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            prev, i = "]", i + 1
            continue
        if c == "[":
            in_class = True
        elif c in "*+{":
            if prev == ")":
                return "a repeated group (matching it can take exponential time)"
            reps += 1
        elif c == "?" and prev not in ("(", "*", "+", "}", "?"):
            opts += 1
        elif c == "|":
            opts += 1
        prev, i = c, i + 1
    if reps > 1 or opts > 2:
        return "too many repetitions or alternatives (matching it can take a very long time)"
    return None


def _check_peft_configs(configs: dict, path: str) -> None:
    """The PEFT metadata a scale is read from: alphas are numbers, patterns safe to match (see above)."""
    for comp, cfg in configs.items():
        where = f"{comp}." if comp else ""
        alpha = cfg.get("lora_alpha")
        if alpha is not None and not _is_number(alpha):
            raise BadInput(path, f"PEFT metadata: {where}lora_alpha is {_short_repr(alpha)}, not a number")
        patterns = cfg.get("alpha_pattern")
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise BadInput(path, f"PEFT metadata: {where}alpha_pattern is not an object")
        for key, value in patterns.items():
            if not _is_number(value):
                raise BadInput(path, f"PEFT metadata: {where}alpha_pattern value of {_short_repr(key)} is "
                                     f"{_short_repr(value)}, not a number")
            problem = _pattern_problem(key)
            if problem:
                raise BadInput(path, f"PEFT metadata: {where}alpha_pattern key {_short_repr(key)}: {problem}")


def _short_repr(x, limit: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "..."


def _pattern_value(patterns: Mapping, module: str):
    """PEFT's rank/alpha pattern lookup: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            continue
    return None


def _alpha_from_config(loc: _Loc, configs: dict) -> tuple[float | None, bool]:
    cfg = _peft_config_for(loc, configs)
    if not cfg:
        return None, False
    alpha = _pattern_value(cfg.get("alpha_pattern"), loc.module)
    if alpha is None:
        alpha = cfg.get("lora_alpha")
    return (float(alpha) if alpha is not None else None), bool(cfg.get("use_rslora"))


def _scalar(t: torch.Tensor) -> float:
    return float(t.float().reshape(-1)[0]) if t.numel() else 1.0


def _make_parts(loc: _Loc, group: dict, configs: dict, label: str) -> tuple[list[Part], list[dict]]:
    roles = {r: t for r, (k, t) in group.items()}
    keys = {r: k for r, (k, t) in group.items()}
    used: set[str] = set()
    parts, refused = [], []
    alpha = _scalar(roles["alpha"]) if "alpha" in roles else None
    rslora = False
    if alpha is None:
        alpha, rslora = _alpha_from_config(loc, configs)

    def take(*names):
        used.update(n for n in names if n in roles)
        return {n: roles[n] for n in names if n in roles}

    def new(kind, tensors, rank):
        scale, convention = 1.0, "1"
        if alpha is not None and rank:
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            convention = "alpha/sqrt(rank)" if rslora else "alpha/rank"
        ks = tuple(keys[r] for r in tensors)
        if "alpha" in roles and kind in ("lora", "loha", "lokr"):
            used.add("alpha")
            ks += (keys["alpha"],)
        return Part(loc.family, loc.side, loc.module, kind, tensors, alpha, rank, scale, ks, label, convention)

    dora = take("dora_scale", "magnitude")
    if "down" in roles or "up" in roles:
        if "down" not in roles or "up" not in roles:
            have = "down" if "down" in roles else "up"
            refused.append({"key": keys[have], "reason": f"incomplete LoRA pair: no lora_{'up' if have == 'down' else 'down'}"})
            used.update(("down", "up"))
        else:
            t = take("down", "up", "up_bias")
            a, b = t["down"], t["up"]
            problem = _lora_shape_problem(a, b, t.get("up_bias"))
            if problem:
                refused.append({"key": keys["up"], "reason": problem})
            else:
                parts.append(new("lora", {**t, **dora}, a.shape[0]))
    hada = [r for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if r in roles]
    if hada:
        t = take(*hada)
        if len(t) < 4:
            refused.append({"key": keys[hada[0]], "reason": "incomplete LoHa: needs hada_w1_a/b and hada_w2_a/b"})
        elif any(x.dim() != 2 for x in t.values()):
            refused.append({"key": keys[hada[0]], "reason": "LoHa tensors are not 2-D (convolution LoHa)"})
        else:
            parts.append(new("loha", {**t, **dora}, t["hada_w1_b"].shape[0]))
    lokr = [r for r in roles if r.startswith("lokr_")]
    if lokr:
        t = take(*lokr)
        ok1 = "lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)
        ok2 = "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)
        if not (ok1 and ok2):
            refused.append({"key": keys[lokr[0]], "reason": "incomplete LoKr: needs w1 (or w1_a, w1_b) and w2"})
        elif any(x.dim() != 2 for x in t.values()):
            refused.append({"key": keys[lokr[0]], "reason": "LoKr tensors are not 2-D (convolution LoKr)"})
        else:
            rank = (t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else
                    t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None)
            parts.append(new("lokr", {**t, **dora}, rank))
    if dora and not any(p.kind in ("lora", "loha", "lokr") for p in parts):
        for r in dora:
            refused.append({"key": keys[r], "reason": "DoRA magnitude without LoRA weights"})
    full = take("diff", "diff_b")
    if full and any(x.dim() == 0 for x in full.values()):
        refused.append({"key": keys[next(iter(full))], "reason": "a single number where a weight difference belongs"})
    elif full and any(x.dim() > (2 if r == "diff" else 1) for r, x in full.items()):
        refused.append({"key": keys[next(iter(full))], "reason": "convolution-only tensor: Flux, CLIP and T5 layers are Linear"})
    elif full:
        parts.append(Part(loc.family, loc.side, loc.module, "full", full, None, None, 1.0,
                          tuple(keys[r] for r in full), label))
    if "value" in roles:
        parts.append(Part(loc.family, loc.side, loc.module, "set", {"value": roles["value"]}, None, None, 1.0,
                          (keys["value"],), label))
        used.add("value")
    if "shape" in roles:
        parts.append(Part(loc.family, loc.side, loc.module, "reshape", {"shape": roles["shape"]}, None, None,
                          1.0, (keys["shape"],), label))
        used.add("shape")
    for p in list(parts):
        problem = _adapter_shape_problem(p)
        if problem:
            parts.remove(p)
            refused.append({"key": p.keys[0], "reason": problem})
    for r in roles:
        if r not in used:
            what = "alpha without LoRA weights" if r == "alpha" else f"{r} without the rest of its adapter"
            refused.append({"key": keys[r], "reason": what})
    return parts, refused


def _lora_shape_problem(a: torch.Tensor, b: torch.Tensor, bias) -> str | None:
    if a.dim() == 4 and a.shape[2:] == (1, 1):
        return "a 1x1 convolution LoRA: Flux layers are Linear"
    if a.dim() != 2 or b.dim() != 2:
        return f"not a Linear LoRA: lora_down {list(a.shape)}, lora_up {list(b.shape)}"
    if b.shape[1] != a.shape[0]:
        return f"shape mismatch: lora_down {list(a.shape)} and lora_up {list(b.shape)} have different ranks"
    if bias is not None and tuple(bias.shape) != (b.shape[0],):
        return f"shape mismatch: lora_B.bias {list(bias.shape)} for lora_up {list(b.shape)}"
    return None


def _adapter_shape_problem(p: Part) -> str | None:
    """Factor shapes that do not multiply, or a DoRA magnitude that fits neither axis."""
    t = p.tensors
    if p.kind == "loha":
        w1a, w1b, w2a, w2b = (t[k].shape for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if w1a[1] != w1b[0] or w2a[1] != w2b[0] or (w1a[0], w1b[1]) != (w2a[0], w2b[1]):
            return f"shape mismatch: LoHa factors {list(w1a)}, {list(w1b)}, {list(w2a)}, {list(w2b)}"
    if p.kind == "lokr":
        for i in "12":
            if f"lokr_w{i}" not in t and t[f"lokr_w{i}_a"].shape[1] != t[f"lokr_w{i}_b"].shape[0]:
                return f"shape mismatch: LoKr w{i}_a {list(t[f'lokr_w{i}_a'].shape)}, w{i}_b {list(t[f'lokr_w{i}_b'].shape)}"
    if p.shape is not None and p.shape[0] * p.shape[1] > MAX_DELTA:
        return (f"too large: its weight delta would be {list(p.shape)}, over {MAX_DELTA} elements "
                "(no Flux, CLIP or T5 layer is that large)")
    dora = p.dora
    if dora is not None and p.shape is not None:
        out, inp = p.shape
        fits = tuple(dora.shape) in ((out,), (out, 1)) if "magnitude" in t else tuple(dora.shape) in ((1, inp), (out, 1))
        if not fits:
            return f"shape mismatch: DoRA magnitude {list(dora.shape)} for a [{out}, {inp}] layer"
    return None


def _expand_covers(part: Part, loc: _Loc, not_placed: list) -> list[Part]:
    """A part covering only some rows of a fused side-a module → side-b parts (A shared, B sliced)."""
    if loc.covers is None:
        return [part]
    m = family_module(loc.family).TABLE.match(loc.module, A)
    rule, values = m.rule, m.values
    names = [rule_name(rule, B, k, values) for k in loc.covers]
    if len(loc.covers) == 1:  # OMI: exactly one part, a rename
        return [_replace(part, side=B, module=names[0])]
    if part.kind != "lora":
        not_placed.append({"key": part.keys[0], "reason": f"{part.kind} on a partial fused module is not supported"})
        return []
    out_rows = part.tensors["up"].shape[0]
    n = len(loc.covers)
    if out_rows % n:
        not_placed.append({"key": part.keys[0], "reason": f"shape mismatch: {out_rows} rows do not split into "
                                                          f"{n} equal parts ({', '.join(names)})"})
        return []
    step = out_rows // n
    made = []
    for i, name in enumerate(names):
        t = dict(part.tensors)
        t["up"] = t["up"][i * step:(i + 1) * step]
        if "up_bias" in t:
            t["up_bias"] = t["up_bias"][i * step:(i + 1) * step]
        if "magnitude" in t:
            t["magnitude"] = t["magnitude"][i * step:(i + 1) * step]
        if "dora_scale" in t and t["dora_scale"].shape[0] == out_rows:
            t["dora_scale"] = t["dora_scale"][i * step:(i + 1) * step]
        elif "dora_scale" in t:
            not_placed.append({"key": part.keys[0], "reason": "DoRA (input axis) on a partial fused module"})
            return []
        made.append(_replace(part, side=B, module=name, tensors=t))
    return made


def _replace(part: Part, **changes) -> Part:
    from dataclasses import replace
    return replace(part, **changes)
