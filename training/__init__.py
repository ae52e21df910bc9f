"""ComfyUI-LongAlign's library: long-text encoding, reward scoring, LoRA I/O and training stages.

Nothing in this package imports ComfyUI: it runs headless (``python -m training.<stage>``) and is
used by the pack's nodes through relative imports.
"""
