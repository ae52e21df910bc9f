"""LongAlign Text Encode: a prompt of any length as sentence segments, one CONDITIONING."""
from __future__ import annotations

import torch

from ..training.encode import SegmentOptions, encode_long_prompts
from ..training.t5 import T5Branch, encode_ct5f
from .comfy_clip import ComfyClipBackend, check_bracket_depth


def encode_prompt(clip, text: str, options: SegmentOptions, t5_adapter: T5Branch | None = None):
    """The node's whole job, callable without ComfyUI's executor (tests, other nodes).

    With ``t5_adapter`` the conditioning is LongSD's ``cat([clip_concat, adapter(T5)], dim=1)``,
    (1, 2L, 768); the empty (negative) prompt takes the same path.
    """
    if clip is None:
        raise ValueError(
            "LongAlign Text Encode: the clip input is None; the checkpoint has no text encoder "
            "(load one with a CLIP loader node)"
        )
    check_bracket_depth(text, "LongAlign Text Encode: text")
    backend = ComfyClipBackend(clip)
    pad = backend.cached_pad_embedding() if options.pad == "mean" and options.token_length else None
    if t5_adapter is None:
        result = encode_long_prompts([text], backend, options, pad=pad)
    else:
        with torch.no_grad():
            result = encode_ct5f([text], backend, t5_adapter, options, pad=pad)
    if not torch.isfinite(result.cond).all():
        raise ValueError(
            "LongAlign Text Encode: the conditioning has non-finite values; a prompt weight such as "
            "(word:nan) or (word:inf) is not a number the encoder can use"
        )
    extras = {} if result.pooled is None else {"pooled_output": result.pooled}
    return [[result.cond, extras]], result


class LongAlignTextEncode:
    """Splits the prompt into sentences, encodes each sentence as its own CLIP window in one batch,
    keeps every segment's BOS and content tokens (drops EOS and padding), concatenates them and
    pads to ``token_length`` with the mean padding embedding (LongAlign, Liu et al. 2024).

    Differs from the stock CLIP Text Encode, which cuts long prompts into 77-token windows at
    exactly 75 tokens (mid-sentence) and keeps each window's EOS and padding rows.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "An SD1.x, SD2.x or SDXL CLIP, or a Long-CLIP-L from CLIP Loader "
                                            "(248 positions: a sentence may then hold up to 246 tokens)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "A prompt of any length; (word:1.2) and embedding: work as usual."}),
                "split": (["sentences", "native"], {
                    "default": "sentences",
                    "tooltip": "sentences: LongAlign segments. native: ComfyUI's own 77-token windows "
                               "(with token_length 0 this is exactly the stock CLIP Text Encode)."}),
                "token_length": ("INT", {
                    "default": 240, "min": 0, "max": 8192, "step": 1,
                    "tooltip": "L: conditioning length in tokens (paper: 240). Longer text is cut, "
                               "shorter text padded. 0 keeps the natural length."}),
                "pad": (["mean", "none"], {
                    "default": "mean",
                    "tooltip": "mean: pad to L with the average padding embedding (paper). none: never pad."}),
                "keep_bos": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Every segment keeps its BOS token (paper). Off: only the first segment's."}),
            },
            "optional": {
                "t5_adapter": ("T5_ADAPTER", {
                    "tooltip": "From T5 Adapter Loader (LongSD): appends TextAdapter(T5(prompt)) to the CLIP "
                               "segments, giving 2 x token_length tokens. Use it on the negative prompt too."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Conditioning for any sampler: (1, L, D) segment embeddings; (1, 2L, D) with a t5_adapter.",)
    FUNCTION = "encode"
    CATEGORY = "LongAlign/conditioning"
    DESCRIPTION = (
        "Encodes a prompt of any length for Stable Diffusion. The prompt is split into sentences; each "
        "sentence is encoded by CLIP on its own and the results are joined, then padded or cut to "
        "token_length tokens (LongAlign, Liu et al. 2024). The stock CLIP Text Encode instead cuts long "
        "prompts every 75 tokens, mid-sentence. Use it for the positive and the negative prompt."
    )

    def encode(self, clip, text, split, token_length, pad, keep_bos, t5_adapter=None):
        options = SegmentOptions(split=split, token_length=token_length, pad=pad, keep_bos=keep_bos)
        conditioning, _ = encode_prompt(clip, text, options, t5_adapter)
        return (conditioning,)
