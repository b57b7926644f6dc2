"""A small stand-in for ComfyUI's V3 node API (`comfy_api.latest`: `io`, `ui`, `ComfyExtension`).

Outside ComfyUI there is no `comfy_api`, yet the headless runner (`fluxbridge run`, `fluxbridge demo`) calls
the very node classes that ComfyUI registers. `host.comfy_io()` hands the nodes this module instead of the
real `io` when ComfyUI is absent. It covers the surface our nodes use, with the real keyword names:
`ComfyNode`, `Schema`, `NodeOutput`, `Hidden`, the widget types (`Int`, `Float`, `String`, `Boolean`,
`Combo`) with `.Input`, the socket types (`Image`, `Mask`, `Latent`, `Conditioning`, `Sigmas`, ...) with
`.Input` / `.Output`, `Custom(io_type)`, and the `ui` outputs (`ui.PreviewText`, ...).

Objects keep the attributes the real ones have (`id`, `optional`, `default`, `min`, `max`, `step`,
`options`, `io_type`, `get_io_type()`, `as_dict()`), so the runner's workflow validation reads a schema the
same way whichever implementation built it. Nothing here imports torch or ComfyUI.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = [
    "ComfyExtension", "ComfyNode", "Schema", "NodeOutput", "Hidden", "HiddenHolder", "NumberDisplay",
    "UploadType", "FolderType", "Input", "WidgetInput", "Output", "ComfyTypeI", "ComfyTypeIO", "Custom",
    "comfytype", "Boolean", "Int", "Float", "String", "Combo", "MultiCombo", "Image", "Mask", "Latent",
    "Conditioning", "Sigmas", "Noise", "Sampler", "Guider", "Model", "Clip", "Vae", "AnyType", "ui", "io",
]


def _pruned(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


class UploadType(str, Enum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """`cls.hidden` of a running node: `unique_id`, `prompt`, `extra_pnginfo`; anything else is None."""

    def __init__(self, unique_id=None, prompt=None, extra_pnginfo=None, **others):
        self.unique_id = unique_id
        self.prompt = prompt
        self.extra_pnginfo = extra_pnginfo
        for key, value in others.items():
            setattr(self, key, value)

    def __getattr__(self, key):  # only called for missing attributes
        return None


# ---------------------------------------------------------------------------------------- inputs / outputs

class _Socket:
    Parent: type | None = None  # the ComfyType class this Input/Output belongs to

    @property
    def io_type(self) -> str:
        return self.Parent.io_type

    def get_io_type(self) -> str:
        return self.io_type

    def validate(self):
        pass


class Input(_Socket):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, extra_dict=None, raw_link: bool = None):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict or {}
        self.rawLink = raw_link

    def as_dict(self) -> dict:
        return _pruned({"display_name": self.display_name, "optional": self.optional or None,
                        "tooltip": self.tooltip, "lazy": self.lazy, "rawLink": self.rawLink}) | self.extra_dict

    def get_all(self) -> list:
        return [self]


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                 lazy: bool = None, default: Any = None, socketless: bool = None, widget_type: str = None,
                 force_input: bool = None, extra_dict=None, raw_link: bool = None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def as_dict(self) -> dict:
        return super().as_dict() | _pruned({"default": self.default, "socketless": self.socketless,
                                            "widgetType": self.widget_type, "forceInput": self.force_input})

    def get_io_type(self) -> str:
        return self.widget_type if self.widget_type is not None else self.io_type


class Output(_Socket):
    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    def as_dict(self) -> dict:
        return _pruned({"display_name": self.display_name, "tooltip": self.tooltip,
                        "is_output_list": self.is_output_list})


class ComfyTypeI:
    Type = Any
    io_type: str = None

    class Input(Input):
        pass


class ComfyTypeIO(ComfyTypeI):
    class Output(Output):
        pass


def comfytype(io_type: str):
    """Class decorator: bind `io_type` and give the type its own Input/Output subclasses."""
    def bind(cls):
        cls.io_type = io_type
        for part in ("Input", "Output"):
            inner = getattr(cls, part, None)
            if inner is not None:
                inner = type(inner.__name__, (inner,), {"Parent": cls, "__qualname__": f"{cls.__name__}.{part}"})
                setattr(cls, part, inner)
        return cls
    return bind


def Custom(io_type: str) -> type:
    """A socket type of our own, e.g. `Custom("FLUXBRIDGE_VAE")`."""
    return comfytype(io_type)(type(io_type, (ComfyTypeIO,), {}))


@comfytype("BOOLEAN")
class Boolean(ComfyTypeIO):
    Type = bool

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: bool = None, label_on: str = None, label_off: str = None,
                     socketless: bool = None, force_input: bool = None, extra_dict=None, raw_link: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.label_on = label_on
            self.label_off = label_off

        def as_dict(self):
            return super().as_dict() | _pruned({"label_on": self.label_on, "label_off": self.label_off})


@comfytype("INT")
class Int(ComfyTypeIO):
    Type = int

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: int = None, min: int = None, max: int = None, step: int = None,
                     control_after_generate: bool = None, display_mode: NumberDisplay = None,
                     socketless: bool = None, force_input: bool = None, extra_dict=None, raw_link: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.min, self.max, self.step = min, max, step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | _pruned({
                "min": self.min, "max": self.max, "step": self.step,
                "control_after_generate": self.control_after_generate,
                "display": self.display_mode.value if self.display_mode else None})


@comfytype("FLOAT")
class Float(ComfyTypeIO):
    Type = float

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default: float = None, min: float = None, max: float = None,
                     step: float = None, round: float = None, display_mode: NumberDisplay = None,
                     socketless: bool = None, force_input: bool = None, extra_dict=None, raw_link: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.min, self.max, self.step, self.round = min, max, step, round
            self.display_mode = display_mode

        def as_dict(self):
            return super().as_dict() | _pruned({
                "min": self.min, "max": self.max, "step": self.step, "round": self.round,
                "display": self.display_mode.value if self.display_mode else None})


@comfytype("STRING")
class String(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, multiline=False, placeholder: str = None, default: str = None,
                     dynamic_prompts: bool = None, socketless: bool = None, force_input: bool = None,
                     extra_dict=None, raw_link: bool = None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input,
                             extra_dict, raw_link)
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts

        def as_dict(self):
            return super().as_dict() | _pruned({"multiline": self.multiline or None,
                                                "placeholder": self.placeholder,
                                                "dynamicPrompts": self.dynamic_prompts})


@comfytype("COMBO")
class Combo(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(self, id: str, options=None, display_name: str = None, optional=False,
                     tooltip: str = None, lazy: bool = None, default=None, control_after_generate: bool = None,
                     upload: UploadType = None, image_folder: FolderType = None, remote=None,
                     socketless: bool = None, extra_dict=None, raw_link: bool = None):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [member.value for member in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, None,
                             extra_dict, raw_link)
            self.multiselect = False
            self.options = list(options) if options is not None else []
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote

        def as_dict(self):
            extra = {self.upload.value: True} if self.upload is not None else {}
            return super().as_dict() | _pruned({
                "options": self.options, "control_after_generate": self.control_after_generate,
                "image_folder": self.image_folder.value if self.image_folder else None}) | extra

    class Output(Output):
        def __init__(self, id: str = None, display_name: str = None, options=None, tooltip: str = None,
                     is_output_list=False):
            super().__init__(id, display_name, tooltip, is_output_list)
            self.options = options if options is not None else []


@comfytype("COMBO")
class MultiCombo(ComfyTypeI):
    Type = list

    class Input(Combo.Input):
        def __init__(self, id: str, options, display_name: str = None, optional=False, tooltip: str = None,
                     lazy: bool = None, default=None, placeholder: str = None, chip: bool = None,
                     control_after_generate: bool = None, socketless: bool = None, extra_dict=None,
                     raw_link: bool = None):
            super().__init__(id, options, display_name, optional, tooltip, lazy, default, control_after_generate,
                             socketless=socketless, extra_dict=extra_dict, raw_link=raw_link)
            self.multiselect = True
            self.placeholder = placeholder
            self.chip = chip


def _socket(name: str, io_type: str) -> type:
    return comfytype(io_type)(type(name, (ComfyTypeIO,), {}))


Image = _socket("Image", "IMAGE")
Mask = _socket("Mask", "MASK")
Latent = _socket("Latent", "LATENT")
Conditioning = _socket("Conditioning", "CONDITIONING")
Sigmas = _socket("Sigmas", "SIGMAS")
Noise = _socket("Noise", "NOISE")
Sampler = _socket("Sampler", "SAMPLER")
Guider = _socket("Guider", "GUIDER")
Model = _socket("Model", "MODEL")
Clip = _socket("Clip", "CLIP")
Vae = _socket("Vae", "VAE")
AnyType = _socket("AnyType", "*")


# ------------------------------------------------------------------------------------------- schema / node

class Schema:
    """The V3 node definition (the fields that matter headless; others are accepted and kept)."""

    def __init__(self, node_id: str, display_name: str = None, category: str = "sd", inputs=None, outputs=None,
                 hidden=None, description: str = "", is_input_list: bool = False, is_output_node: bool = False,
                 is_deprecated: bool = False, is_experimental: bool = False, is_api_node: bool = False,
                 not_idempotent: bool = False, enable_expand: bool = False, **others):
        self.node_id = node_id
        self.display_name = display_name
        self.category = category
        self.inputs = list(inputs or [])
        self.outputs = list(outputs or [])
        self.hidden = list(hidden or [])
        self.description = description
        self.is_input_list = is_input_list
        self.is_output_node = is_output_node
        self.is_deprecated = is_deprecated
        self.is_experimental = is_experimental
        self.is_api_node = is_api_node
        self.not_idempotent = not_idempotent
        self.enable_expand = enable_expand
        for key, value in others.items():
            setattr(self, key, value)

    def validate(self):
        ids = [i.id for i in self.inputs] + [o.id for o in self.outputs if o.id is not None]
        duplicated = sorted({x for x in ids if ids.count(x) > 1})
        if duplicated:
            raise ValueError(f"{self.node_id}: input/output ids must be unique, but {duplicated} are not")

    def finalize(self):
        if self.is_output_node:
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"


class ComfyNode:
    """Base class of a V3 node: `define_schema()` and `execute(**inputs)` are classmethods."""

    hidden = HiddenHolder()

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.finalize()
        schema.validate()
        return schema


class NodeOutput:
    """What `execute` returns: the output values in order, plus an optional `ui` payload (dict or ui object)."""

    def __init__(self, *args: Any, ui=None, expand: dict = None, block_execution: str = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index):
        return self.args[index]

    @classmethod
    def from_dict(cls, data: dict) -> "NodeOutput":
        return cls(*data.get("result", ()), ui=data.get("ui"), expand=data.get("expand"))


class ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list:
        return []


# ------------------------------------------------------------------------------------------------------ ui

class _UIOutput:
    def as_dict(self) -> dict:
        raise NotImplementedError


class _UI:
    """`ui` namespace: the UI payloads nodes attach to their output."""

    class PreviewText(_UIOutput):
        def __init__(self, value: str, **kwargs):
            self.value = value

        def as_dict(self) -> dict:
            return {"text": (self.value,)}

    class SavedResult(dict):
        def __init__(self, filename: str, subfolder: str, type: FolderType):
            super().__init__(filename=filename, subfolder=subfolder,
                             type=type.value if isinstance(type, Enum) else type)

    class SavedImages(_UIOutput):
        def __init__(self, results: list, is_animated: bool = False):
            self.results = results
            self.is_animated = is_animated

        def as_dict(self) -> dict:
            return {"images": list(self.results), "animated": (self.is_animated,)}


ui = _UI

# `from .io_standalone import io` reads like `from comfy_api.latest import io`
import sys as _sys  # noqa: E402

io = _sys.modules[__name__]
