"""ComfyUI-LongAlign: long-prompt alignment for Stable Diffusion in ComfyUI.

ComfyUI imports this file; it only registers nodes and the web extension. The library lives in
``training/`` and never imports ComfyUI.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
