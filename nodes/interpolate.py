"""Text Embedding Interpolate: ``a * c_ft + (1 - a) * c_orig`` (TextCraftor's style/fidelity control)."""
from __future__ import annotations

from ..training.interpolate import interpolate_conditioning


class TextEmbeddingInterpolate:
    """Blends the conditioning of a fine-tuned text encoder (e.g. a TextCraftor LoRA applied to CLIP
    with LoraLoader) with the original encoder's: ``c = a E_ft(p) + (1 - a) E_orig(p)`` (Li et al.,
    TextCraftor, CVPR 2024). a = 1 is the fine-tuned encoder, a = 0 the original."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning_ft": ("CONDITIONING", {"tooltip": "The prompt encoded by the fine-tuned text encoder."}),
                "conditioning_orig": ("CONDITIONING", {
                    "tooltip": "The same prompt encoded by the original text encoder (same token_length)."}),
                "factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "a: 1 = fine-tuned only, 0 = original only."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "interpolate"
    CATEGORY = "conditioning/longalign"

    def interpolate(self, conditioning_ft, conditioning_orig, factor: float):
        return (interpolate_conditioning(conditioning_ft, conditioning_orig, factor),)
