"""FluxBridge: FLUX.1 in ComfyUI through diffusers, and an exact converter between Flux weight layouts.

ComfyUI imports this file by path from `custom_nodes/<any folder name>/` and calls `comfy_entrypoint()`
(the V3 node API); after `pip install -e .` the same code imports as `fluxbridge` and gives the `fluxbridge`
command. Importing it loads nothing heavy: no torch, diffusers, transformers or ComfyUI module.
"""

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"  # the frontend extension; registered here only, not in pyproject's [tool.comfy]


async def comfy_entrypoint():
    """ComfyUI (>= 0.3.47) calls this and registers the nodes of the extension it returns."""
    from .runtime.host import extension_class
    from .nodes import NODE_LIST

    class FluxBridgeExtension(extension_class()):
        async def get_node_list(self):
            return list(NODE_LIST)

    return FluxBridgeExtension()
