"""LongAlign Text Encode vs the stock CLIP Text Encode on the same CLIP (issue 2 / issue 11).

Prompts of 50, 200, 500 and 1000 CLIP tokens, made of ordinary sentences; both nodes run in-process
on one ComfyUI CLIP (SD1.5-size ViT-L/14 text encoder built from config; tiny in ``--quick``),
interleaved, medians. The LongAlign node runs one row per sentence (the method) where the stock node
runs one row per 75 tokens, so its cost depends on sentence length; with L = 240 it encodes only the
sentences that fit in L.
"""
from __future__ import annotations

import torch

from .common import Result, paired_median_times
from .comfy_setup import comfy_ready

SENTENCES = [
    "A weathered lighthouse stands on a jagged cliff above a restless grey sea.",
    "Waves crash against black rocks and throw white spray high into the cold evening air.",
    "A small red fishing boat with a blue cabin rocks gently beside a narrow wooden pier.",
    "Three seagulls circle overhead, their wings lit orange by the last light of the sun.",
    "An old keeper in a green raincoat holds a brass lantern in the open doorway.",
    "Purple storm clouds roll in from the horizon while lightning strikes the distant water.",
    "Wild pink flowers and yellow gorse grow between the rocks and bend in the strong wind.",
    "The scene is painted like a detailed nineteenth century oil painting with dramatic light.",
]


def prompt_of(tokens: int, count) -> str:
    """Whole sentences until the prompt has about ``tokens`` CLIP tokens."""
    words: list[str] = []
    i = 0
    while True:
        sentence = SENTENCES[i % len(SENTENCES)]
        candidate = " ".join(words + [sentence])
        if words and count(candidate) > tokens:
            break
        words.append(sentence)
        i += 1
        if count(candidate) >= tokens:
            break
    return " ".join(words)


def run(quick: bool) -> list[Result]:
    comfy_ready(quick)
    import nodes as comfy_nodes
    from comfy_inprocess import comfy_clip_from_transformers, load_pack
    from tiny_models import tiny_clip_text_model

    from training.clip_text import clip_tokenizer

    pack = load_pack()
    layers = 2 if quick else 12
    gpu = torch.cuda.is_available() and not quick
    clip = comfy_clip_from_transformers(tiny_clip_text_model(num_layers=layers),
                                        torch.float16 if gpu else torch.float32)
    tokenizer = clip_tokenizer()
    count = lambda t: len(tokenizer(t, verbose=False)["input_ids"]) - 2
    ours_node = pack.NODE_CLASS_MAPPINGS["LongAlignTextEncode"]()
    stock_node = comfy_nodes.CLIPTextEncode()
    results = []
    for tokens in (50, 200, 500, 1000):
        text = prompt_of(tokens, count)
        with torch.inference_mode():
            ours, stock = paired_median_times(
                lambda: ours_node.encode(clip, text, "sentences", 240, "mean", True),
                lambda: stock_node.encode(clip, text),
                repeats=3 if quick else 25, warmup=3,
            )
        ratio = ours / stock
        results.append(Result(
            f"encode {count(text)} tokens ({'tiny' if quick else 'ViT-L'} CLIP, {'GPU fp16' if gpu else 'CPU'})", ours * 1e3, stock * 1e3,
            "ms", "<= 1.1x", None if quick else ratio <= 1.1,
            note=f"{len(pack.training.segments.split_sentences(text))} sentences",
        ))
    return results
