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
    OUTPUT_TOOLTIPS = ("a x conditioning_ft + (1 - a) x conditioning_orig, for any sampler.",)
    FUNCTION = "interpolate"
    CATEGORY = "LongAlign/conditioning"
    DESCRIPTION = (
        "Blends a prompt encoded by a fine-tuned text encoder (for example a TextCraftor LoRA loaded "
        "with Load LoRA) with the same prompt encoded by the original one: c = a x fine-tuned + "
        "(1 - a) x original (TextCraftor, Li et al. 2024). factor 1 keeps only the fine-tuned encoder, "
        "0 only the original: a dial between the new style and the original model's fidelity."
    )

    def interpolate(self, conditioning_ft, conditioning_orig, factor: float):
        return (interpolate_conditioning(conditioning_ft, conditioning_orig, factor),)
