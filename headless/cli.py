"""The `fluxbridge` command (also `python -m fluxbridge`).

Each sub-command is a thin shell around one library function, imported only when that command runs.
Exit status: 0 done; 2 bad input (`errors.BadInput`: one line on stderr naming the file and the cause, no
traceback); 1 a fault of our own (message and traceback on stderr). Every command prints when its work is
done, so a reader that closes the pipe early (`fluxbridge inspect F | head`) ends it quietly, with 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from .. import __version__
from ..common.errors import BadInput
from ..common.jsonable import jsonable
from ..runtime import host

PROG = "fluxbridge"
WEIGHT_LAYOUTS = ("bfl", "comfy", "diffusers")
LORA_FORMATS = ("diffusers", "bfl", "kohya", "comfy")
DTYPES = ("keep", "bf16", "fp16", "fp32")
LIST_LIMIT = 20  # text output shows at most this many items of a list (--json shows all)
# Loggers that speak up while the libraries import, when torchao is installed (the quant extra): torchao
# (its CUDA-only kernels do not load on a CPU machine), torch's pytree (a deprecation inside torchao), and
# the quantizer modules of diffusers and transformers (torchao classes they cannot find). Below ERROR they
# would break "a failing command's stderr is its one line" on every command, quantizing or not.
IMPORT_CHATTER = ("torchao", "torch.utils._pytree", "diffusers.quantizers", "transformers.quantizers")


# ---------------------------------------------------------------------------------------------- output

def _print_json(data):
    print(json.dumps(jsonable(data), indent=2))


def _short(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_short(v) for v in value]
        more = f", ... ({len(items) - LIST_LIMIT} more)" if len(items) > LIST_LIMIT else ""
        return ", ".join(items[:LIST_LIMIT]) + more
    return str(value)


def _render(data: dict, first=()) -> str:
    """Readable text: the keys in `first` (when present), then the rest; dicts and lists indented; empty
    values (None, "", [], {}) left out (--json shows every key)."""
    lines = []
    for key in [k for k in first if k in data] + [k for k in data if k not in first]:
        value = data[key]
        if value is None or (isinstance(value, (str, list, tuple, dict)) and not value):
            continue
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {_short(v)}" for k, v in value.items()]
        elif isinstance(value, (list, tuple)) and value and key in ("warnings", "not_placed"):
            lines.append(f"{key}:")
            lines += [f"  - {_short(v)}" for v in value[:LIST_LIMIT]]
            if len(value) > LIST_LIMIT:
                lines.append(f"  ... ({len(value) - LIST_LIMIT} more; --json shows all)")
        else:
            lines.append(f"{key}: {_short(value)}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- commands

def _cmd_inspect(args):
    from ..convert.inspect import inspect_path
    info = inspect_path(args.path)
    if args.json:
        _print_json(info)
        return
    text = dict(info)
    if text.get("total_tensors") == text.get("tensor_count"):  # one count when the file is one model
        text.pop("total_tensors", None)
    if (text.get("quantization") or {}).get("scheme") == "none":  # nothing quantized: nothing to say
        text.pop("quantization")
    print(_render(text, ("path", "family", "layout", "variant", "dtypes", "config", "tensor_count",
                         "warnings")))


def _cmd_convert(args):
    from ..convert.write import convert_file
    _print_json(convert_file(args.src, args.dst, args.to, args.dtype, args.lora))


def _cmd_lora_inspect(args):
    from ..convert.lora.inspect import inspect_lora
    info = inspect_lora(args.path)
    if args.json:
        _print_json(info)
    else:
        print(_render(info, ("path", "format", "targets", "target_modules", "ranks", "alphas",
                             "text_encoder", "not_placed", "warnings")))


def _cmd_lora_convert(args):
    from ..convert.lora.write import convert_lora
    _print_json(convert_lora(args.src, args.dst, args.to))


def _cmd_run(args):
    from .runner import run_workflow
    _print_json(run_workflow(args.workflow, models_dir=args.models, output_dir=args.output, input_dir=args.input,
                             lowvram=args.lowvram))


def _cmd_demo(args):
    from .demo import run_demo, summary
    report = run_demo(args.output)
    if args.json:
        _print_json(report)
    else:
        print(summary(report))


def _lora_spec(text: str):
    """FILE[:STRENGTH] -> (file, strength); a tail that is not a number belongs to the file name."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's two lines
        description="FluxBridge: inspect and convert FLUX.1 weights and LoRAs between layouts, and run "
                    "FluxBridge workflows without ComfyUI.",
        epilog="Exit status: 0 done, 2 bad input (one line on stderr), 1 internal error.\n"
               f"Run '{PROG} COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "inspect", help="say what a weights file or diffusers folder is",
        description="Detect what a weights file (.safetensors, .gguf) or a diffusers folder holds: family "
                    "(flux-transformer, flux-vae, clip-l, t5-xxl, flux-lora, ...), layout (bfl, comfy, "
                    "diffusers, kohya, ...), variant (dev, schnell, fill, ...), dtypes, the configuration "
                    "inferred from the tensor shapes, the tensor count and any warnings. Reads headers "
                    "only; nothing is loaded into memory.")
    p.add_argument("path", help="a weights file or a diffusers model folder")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "convert", help="rewrite full weights in another layout",
        description="Rewrite full model weights in another layout (renaming, splitting and fusing tensors "
                    "as the layouts require), optionally with LoRAs baked in: each LoRA's parts that target "
                    "this model (transformer, CLIP-L or T5) are merged. Prints a JSON report of what was "
                    "renamed, split, fused, swapped, filled, dropped and which LoRA parts were applied.",
        epilog="example: fluxbridge convert flux1-dev.safetensors flux1-dev-diffusers --to diffusers "
               "--lora style.safetensors:0.8")
    p.add_argument("src", help="the weights to read (file or diffusers folder)")
    p.add_argument("dst", help="where to write (a .safetensors file; a folder for --to diffusers)")
    p.add_argument("--to", required=True, choices=WEIGHT_LAYOUTS, help="the target layout")
    p.add_argument("--dtype", default="keep", choices=DTYPES,
                   help="store the floating-point weights in this dtype (default: keep as they are)")
    p.add_argument("--lora", action="append", default=[], type=_lora_spec, metavar="FILE[:STRENGTH]",
                   help="bake this LoRA in at STRENGTH (default 1.0); repeat for several")
    p.set_defaults(func=_cmd_convert)

    lora = sub.add_parser("lora", help="inspect or convert a LoRA",
                          description="Inspect or convert a Flux LoRA (diffusers/PEFT, BFL, kohya, "
                                      "ComfyUI, XLabs, ... formats).")
    lora_sub = lora.add_subparsers(dest="lora_command", metavar="SUBCOMMAND")
    p = lora_sub.add_parser(
        "inspect", help="say what a LoRA file holds",
        description="Detect a LoRA's format and list the modules it targets, its ranks and alphas, its "
                    "text-encoder parts, and the keys it cannot place (with the reason).")
    p.add_argument("path", help="the LoRA file")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=_cmd_lora_inspect)
    p = lora_sub.add_parser(
        "convert", help="rewrite a LoRA in another format",
        description="Rewrite a LoRA in another format. The result loads in the tool that format belongs "
                    "to and gives the same weight deltas. Prints a JSON report.")
    p.add_argument("src", help="the LoRA file to read")
    p.add_argument("dst", help="the .safetensors file to write")
    p.add_argument("--to", required=True, choices=LORA_FORMATS, help="the target format")
    p.set_defaults(func=_cmd_lora_convert)
    lora.set_defaults(func=None, parser=lora)

    p = sub.add_parser(
        "run", help="run an API-format workflow without ComfyUI",
        description="Execute an API-format workflow (ComfyUI's 'Export (API)') headless, without ComfyUI. "
                    "The workflow is validated in full before anything runs. Model names resolve only "
                    "inside the models folder, which has ComfyUI's sub-folders: diffusion_models/, "
                    "text_encoders/, vae/, loras/ (style_models/ and clip_vision/ for Redux), optionally "
                    "tokenizers/clip_l/ and tokenizers/t5xxl/ (else the pack's own tokenizers are used). "
                    "Prints a JSON report of the files written.")
    p.add_argument("workflow", metavar="WORKFLOW.json", help="the API-format workflow file")
    p.add_argument("--models", metavar="DIR", help="the models folder (default: $FLUXBRIDGE_MODELS)")
    p.add_argument("--output", metavar="DIR", default="output", help="where files go (default: ./output)")
    p.add_argument("--input", metavar="DIR", help="where LoadImage finds images (default: $FLUXBRIDGE_INPUT "
                                                 "or ./input)")
    p.add_argument("--lowvram", action="store_true",
                   help="on a CUDA GPU, run every model with diffusers' group offloading (weights in RAM, one "
                        "block at a time on the GPU), even those that fit; a model that does not fit is "
                        "offloaded anyway")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "demo", help="run the text-to-image example on small random models",
        description="Build small random Flux models (once), run the text-to-image "
                    "example workflow on them, write the image and its JSON report into the output folder "
                    "and print a short summary. Needs nothing but the installed pack: no downloads, no GPU.")
    p.add_argument("--output", metavar="DIR", default="output", help="where files go (default: ./output)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of a summary")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    for name in IMPORT_CHATTER:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        (getattr(args, "parser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        func(args)
        sys.stdout.flush()  # a closed pipe shows here, not when the interpreter exits
    except BrokenPipeError:  # the reader has all it wanted (`| head`): the work is done, end quietly
        _drop_stdout()
        return 0
    except BadInput as exc:
        print(f"{PROG}: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2
    except (KeyboardInterrupt, host.Interrupted):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a fault of ours: say so, with the traceback
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 1
    return 0


def _drop_stdout():
    """Point stdout at the null device, so that the interpreter's last flush meets no closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (tests, embedding)
        pass
    finally:
        os.close(devnull)
