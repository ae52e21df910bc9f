"""ComfyUI-LongAlign: long-prompt alignment for Stable Diffusion in ComfyUI.

ComfyUI imports this file; it only registers nodes, the web extension and (inside a running
ComfyUI server) the pack's HTTP route. The library lives in ``training/`` and never imports ComfyUI.
"""
import sys

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"


def _register_routes() -> None:
    """Adds ``/longalign/tokenize`` to ComfyUI's server when one is running (ComfyUI creates it
    before loading custom nodes); imported anywhere else, the pack adds nothing."""
    prompt_server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if prompt_server is not None:
        from .nodes.routes import register

        register(prompt_server.routes)


_register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
