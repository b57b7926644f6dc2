"""ComfyUI V3 node classes (thin: read inputs, call the library, shape the outputs).

`NODE_LIST` is what `comfy_entrypoint()` registers, in the order of docs/NODES.md. The node modules get
the V3 `io` namespace through `runtime.host.comfy_io()` when they are imported (lazily, by `comfy_entrypoint`).
The model objects they pass around, the load cache and the LoRA design are in `runtime/models.py`.
"""
from . import conditioning, convert, image, latent, loaders, native, sampling

NODE_LIST = [
    loaders.LoadTransformer,
    loaders.LoadTextEncoders,
    loaders.LoadVAE,
    loaders.LoadLoRA,
    loaders.LoadRedux,
    conditioning.TextEncode,
    latent.EmptyLatent,
    sampling.Scheduler,
    sampling.AddNoise,
    sampling.SchedulerStep,
    sampling.Sampler,
    latent.VAEDecode,
    latent.VAEEncode,
    conditioning.FillConditioning,
    conditioning.ControlConditioning,
    conditioning.KontextReference,
    image.KontextImageScale,
    conditioning.ReduxConditioning,
    convert.SaveTransformer,
    convert.SaveVAE,
    convert.ConvertLoRA,
    native.LoadNativeModel,
    native.NativeLoRA,
]
