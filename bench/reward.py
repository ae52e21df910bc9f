"""The decomposed reward scorer against a bare ``CLIPModel`` pass on the same model and inputs.

* Throughput: ``training.scoring.score_images`` from raw ``(B, 3, 512, 512)`` images in [0, 1] and raw
  multi-sentence prompts (splitting, tokenising, crop/resize/normalise, features, direction,
  decomposition) vs ``get_image_features`` on already-preprocessed 224 pixels +
  ``get_text_features`` on already-tokenised sentence rows: the model compute the scorer cannot
  avoid. Target: at most 1.05x the time on the ViT-H-14-size model (built from the laion
  CLIP-ViT-H-14 config, random weights; not quick); the tiny model (quick) is reported only, since
  cropping and resizing 512px images alone costs more than its forward.
* Memory: peak CUDA memory of a backward pass through the scorer into the images at batch 8,
  beyond the weights, vs the bare image tower's backward on preprocessed pixels (CUDA only).
"""
from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel

from training.scoring import preprocess_images, reward_loss, score_images
from training.reward_models import TransformersPreferenceModel
from training.segments import split_sentences

from .common import Result, paired_median_times

TINY = CLIPConfig(
    text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=77),
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       image_size=224, patch_size=14),
    projection_dim=64,
)
VIT_H_14 = CLIPConfig(
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)
PROMPTS = [
    "A red fox sits in deep snow at the edge of a pine forest. The sky is pale grey. Snowflakes drift down slowly.",
    "A bowl of ramen on a dark wooden table. A soft-boiled egg and green onions float in the broth. Steam rises.",
    "An old lighthouse on a cliff above a stormy sea. Waves break on black rocks; spray rises into the wind.",
    "A busy night market with lanterns over the stalls. People walk between baskets of spices. A cat sleeps on a crate.",
]


def _model(config: CLIPConfig, device: torch.device, dtype: torch.dtype) -> TransformersPreferenceModel:
    torch.manual_seed(0)
    with device:  # initialised where it runs (a ViT-H initialises in seconds on a GPU, a minute on a CPU)
        model = CLIPModel(config).to(dtype)
    return TransformersPreferenceModel("denscore", "built from config", model, model.logit_scale.exp().item(),
                                       config.vision_config.image_size)


def _throughput(name: str, rm: TransformersPreferenceModel, batch: int, repeats: int, warmup: int,
                asserted: bool) -> Result:
    device = rm.device
    images = torch.rand(batch, 3, 512, 512, device=device)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" Variant {i}." for i in range(batch)]
    ids = rm.tokenize([s for p in prompts for s in split_sentences(p)])
    pixels = preprocess_images(images, rm.image_size, rm.mean, rm.std).to(rm.dtype)

    @torch.no_grad()
    def ours():
        return score_images(rm, images, prompts, direction="batch").reweighted

    @torch.no_grad()
    def bare():
        rm.model.get_text_features(input_ids=ids)
        return rm.model.get_image_features(pixel_values=pixels)

    t_ours, t_bare = paired_median_times(ours, bare, repeats=repeats, warmup=warmup)
    note = f"{batch / t_ours:.1f} vs {batch / t_bare:.1f} images/s; {ids.shape[0]} sentences"
    if not asserted:
        note += "; reported: preprocessing 512px images costs more than a tiny model"
    return Result(f"reward scorer {name} b{batch} ({device.type})", t_ours, t_bare, "s",
                  "<=1.05x" if asserted else "report", t_ours <= 1.05 * t_bare if asserted else None, note)


def _backward_memory(rm: TransformersPreferenceModel, batch: int = 8) -> Result:
    name = f"reward backward peak memory b{batch}"
    if rm.device.type != "cuda":
        return Result(name, float("nan"), float("nan"), "G", "report", None, "not measured: CUDA only")
    prompts = [PROMPTS[i % len(PROMPTS)] + f" Variant {i}." for i in range(batch)]

    def peak(fn) -> float:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 30

    def ours():
        images = torch.rand(batch, 3, 512, 512, device=rm.device, requires_grad=True)
        reward_loss(score_images(rm, images, prompts, direction="batch", train=True)).backward()

    def bare():
        pixels = torch.randn(batch, 3, rm.image_size, rm.image_size, device=rm.device, dtype=rm.dtype,
                             requires_grad=True)
        rm.model.get_image_features(pixel_values=pixels).pooler_output.float().sum().backward()

    ours_gib, bare_gib = peak(ours), peak(bare)
    return Result(name, ours_gib, bare_gib, "G", "report", None, "beyond the weights; bare = image tower only")


def run(quick: bool) -> list[Result]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tiny = _model(TINY, device, dtype)
    results = [_throughput("tiny", tiny, 8, 7, 2, asserted=False)]
    if quick:
        return results + [_backward_memory(tiny)]
    vit_h = _model(VIT_H_14, device, dtype)
    # on a CPU a ViT-H batch takes seconds: a smaller batch and fewer repeats keep the run short
    results.append(_throughput("ViT-H-14", vit_h, 8 if cuda else 2, 7 if cuda else 3, 2 if cuda else 1, asserted=True))
    results.append(_backward_memory(vit_h))
    return results
