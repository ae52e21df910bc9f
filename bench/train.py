"""One ``reward`` training step: the fast mode vs ``--mode reference``, measured in one run (issues 11, 20).

Both sides are our trainer's own objective, denoiser and optimizer, set up the way ``training.stages``
sets them up, with the UNet prepared the way the trainer's accelerate prepares it (bf16 autocast
inside the UNet's forward only, :func:`_prepared`); ``reference`` runs the way the reference code
runs (LoRA unmerged with dropout 0.1 on all calls, one activation checkpoint around the whole UNet
at the K gradient calls, the batch's images VAE-encoded every step, the whole batch decoded with
gradient in bf16 without autocast, plain AdamW); ``fast`` is the default mode (merged-weight shadow
UNet for the no-grad calls, per-block checkpointing, chunked decode back-propagated into ``x0``,
fused AdamW on CUDA, ``torch.compile`` of the UNet calls on CUDA, the no-grad shadow in
channels-last). Same seeds, same prompts, same number of steps. Each side is built, measured (one
warm-up step, then the median step time and the peak CUDA memory over the same steps) and freed
before the other.

``--quick``: the tiny preset on the CPU (timings reported, not asserted). Full: SD1.5 shapes from the
shipped configs with random weights, ct5f context (T5-large + TextAdapter, 480 tokens), a
ViT-H-14-size reward model, 512x512, batch 8, bf16, 50 DDIM steps, K = 5, CFG 7.5 (CUDA only).
The SDXL rows are :mod:`.sdxl`'s.
"""
from __future__ import annotations

import gc
import json
import os
import sys

import torch

from training.config import SamplingConfig

from .common import Result, median_time
from .comfy_setup import comfy_folder

PROMPTS = [
    "A weathered lighthouse stands on a cliff above a grey sea. Waves crash on black rocks below.",
    "A red fishing boat rocks beside a wooden pier. Three seagulls circle above it in the evening light.",
    "An old keeper in a green raincoat holds a brass lantern. Rain falls on the stone steps behind him.",
    "Purple storm clouds roll in over the water. A single fork of lightning strikes the horizon.",
    "A black cat sits on an upturned barrel. Fishing nets hang drying on wooden poles nearby.",
    "Wild pink flowers grow between the rocks. The wind bends them towards the sea.",
    "A cargo ship glows faintly far out at sea. A trail of smoke rises behind it into the rain.",
    "Small puddles on the rocks reflect the violet sky. Each one ripples in the wind.",
]
T5_LARGE = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16,
                feed_forward_proj="relu", is_encoder_decoder=False)


def _components(full: bool, device: torch.device, family: str = "sd15"):
    """UNet, VAE, text encoder(s), tokenizer, noise schedule of ``family`` (``sd15``, ``sdxl``): its
    shapes from the shipped configs (full; initialised on ``device``, which is much faster than on the
    host) or the tiny preset."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from training.clip_text import clip_tokenizer
    from training.config import ModelConfig
    from training.families import family_named
    from training.models import TEXT_ENCODER_CLASSES, Components, load_components

    if not full:
        return load_components(ModelConfig(tiny=True, family=family))
    fam = family_named(family)
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(fam.configs, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(fam.configs, subfolder="vae"))
        encoders = [cls(cls.config_class.from_pretrained(os.path.join(fam.configs, sub)))
                    for cls, sub in zip(TEXT_ENCODER_CLASSES, fam.text_encoders)]
    fam.prepare_unet(unet)
    return Components(unet, vae, encoders[0], clip_tokenizer(),
                      DDPMScheduler.from_pretrained(fam.configs, subfolder="scheduler", local_files_only=True),
                      fam, *encoders[1:])


def _t5_branch(full: bool, device, dtype):
    from transformers import T5Config, T5EncoderModel

    from training.adapter import TextAdapter
    from training.t5 import T5Branch, t5_tokenizer

    torch.manual_seed(0)
    config = T5Config(**T5_LARGE) if full else T5Config(**{**T5_LARGE, "d_model": 64, "d_ff": 128, "num_layers": 2,
                                                           "num_heads": 4, "d_kv": 16})
    with device:
        encoder = T5EncoderModel(config).to(dtype).eval().requires_grad_(False)
        adapter = TextAdapter(config.d_model, 896 if full else 48, 768).to(dtype).eval().requires_grad_(False)
    folder = os.path.join(comfy_folder(), "comfy", "text_encoders", "t5_tokenizer")  # ComfyUI ships T5's files
    return T5Branch(t5_tokenizer(folder), encoder, adapter)


def _reward_model(full: bool, device, dtype):
    from training.tiny import tiny_reward_model

    if not full:
        return tiny_reward_model()
    from .reward import VIT_H_14, _model

    return _model(VIT_H_14, device, dtype)


def _compile(device: torch.device) -> bool:
    """The fast mode compiles its UNet calls on CUDA, as ``run.compile auto`` does."""
    return device.type == "cuda"


def _prepared(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` as the trainer's ``accelerator.prepare`` leaves it (one process): on CUDA its forward
    runs under bf16 autocast and returns fp32 outputs (accelerate's mixed precision). The reference
    scripts prepare the UNet (and, in align, the TextAdapter) the same way, so in both only those
    forwards run under autocast: the text encoders, the VAE and the reward model run in bf16 without
    it (under autocast the VAE decoder's GroupNorms and SiLUs keep fp32 activations)."""
    if device.type != "cuda":
        return module
    from accelerate import Accelerator

    return Accelerator(mixed_precision="bf16").prepare_model(module, device_placement=False)


def _trainable(full: bool, device: torch.device, family: str = "sd15"):
    """Frozen components in the weight dtype with a rank-32 (tiny: 4) LoRA, dropout 0.1 as the
    reference trains, the UNet prepared as the trainer prepares it (:func:`_prepared`), and the
    family's conditioner (SD1.5: ct5f; SDXL: CLIP-L + bigG with the pooled row):
    ``(components, lora params, conditioner, dtype)``."""
    from training.lora import add_lora

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = _components(full, device, family)
    for module in c.frozen_modules():
        module.requires_grad_(False).to(device, dtype)
    params = add_lora(c.unet, 32 if full else 4, 32.0 if full else 4.0, dropout=0.1)
    for p in params:
        p.data = p.data.float()
    c.unet = _prepared(c.unet, device)
    t5 = _t5_branch(full, device, dtype) if family == "sd15" else None  # the T5 branch is SD1.5-only
    return c, params, c.conditioner(240 if full else 77, t5), dtype


def _optimizer_step(objective, data: dict, params: list, fast: bool, device: torch.device):
    """One training step as the trainer runs it: loss (autocast only inside the prepared modules'
    forwards, :func:`_prepared`), backward, clip 0.3, AdamW (fused in fast mode on CUDA); a fresh
    seeded generator per step."""
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=1e-2, **({"fused": True} if fast and cuda else {}))
    counter = iter(range(10**6))

    def step() -> None:
        generator = torch.Generator(device=device).manual_seed(next(counter))
        loss, _ = objective.loss(data, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


DECODE_CHUNK = SamplingConfig().decode_chunk


def _reward_step(mode: str, full: bool, device: torch.device, checkpoint_calls: bool = False, family: str = "sd15",
                 resolution: int | None = None):
    """A closure running one optimizer step of the reward stage in ``mode``, and the batch size
    (``checkpoint_calls``: the fast mode's ``sampling.checkpoint_calls`` setting). Full size: SD1.5 at
    512 px, batch 8; SDXL at ``resolution`` (512 px unless given), batch 1, the 24 GiB example
    configs' setting."""
    from training.denoisers import CheckpointedUNet, MergedShadowUNet
    from training.objectives.reward import RewardObjective

    c, params, conditioner, dtype = _trainable(full, device, family)
    fast = mode == "fast"
    denoiser = (MergedShadowUNet(c.unet, compile=_compile(device), checkpoint_calls=checkpoint_calls) if fast
                else CheckpointedUNet(c.unet, "unet"))
    resolution, batch = ((resolution or 512, 8 if family == "sd15" else 1) if full else (resolution or 64, 2))
    steps, K = (50, 5) if full else (6, 2)
    objective = RewardObjective(denoiser, c.vae, c.scheduler, conditioner, _reward_model(full, device, dtype),
                                (4, resolution // 8, resolution // 8), steps, 7.5, K, 0.3, None, dtype,
                                decode_chunk=DECODE_CHUNK if fast else 0, reference_encodes_images=not fast)
    return _optimizer_step(objective, {"caption": PROMPTS[:batch]}, params, fast, device), batch


def _align_step(mode: str, full: bool, device: torch.device, low_memory: bool = False):
    """One optimizer step of ``align``, the TextAdapter trained beside the LoRA (fp32, prepared) as the
    trainer and the reference train it: fast = cached frozen encoders (warm: a later epoch), fused
    AdamW on CUDA; reference = VAE and text encoders every step, plain AdamW. ``low_memory``: the
    fast mode with diffusers' gradient checkpointing."""
    from training.feature_cache import FeatureCache
    from training.objectives.align import AlignObjective

    c, params, conditioner, dtype = _trainable(full, device)
    adapter = conditioner.t5.adapter.float().requires_grad_(True)  # align trains it beside the LoRA (trainer)
    conditioner.t5.adapter = _prepared(adapter, device)
    params = params + list(adapter.parameters())
    if low_memory:
        c.unet.enable_gradient_checkpointing()
    fast = mode == "fast"
    unet = torch.compile(c.unet, dynamic=False) if fast and _compile(device) else c.unet
    objective = AlignObjective(unet, c.vae, c.scheduler, conditioner, 0.1, dtype,
                               FeatureCache(8 * 2**30) if fast else None)
    resolution, batch = (512, 16) if full else (64, 4)
    g = torch.Generator().manual_seed(0)
    data = {"pixel_values": torch.rand(batch, 3, resolution, resolution, generator=g).to(device, dtype) * 2 - 1,
            "caption": (PROMPTS * 2)[:batch], "index": list(range(batch))}
    return _optimizer_step(objective, data, params, fast, device), batch


def _measure(mode: str, full: bool, device: torch.device, repeats: int, build=None,
             label: str = "reward step") -> tuple[float, float | None]:
    """(seconds per sample, peak CUDA GiB or None) of ``build(mode, full, device)``'s step: one
    warm-up step (it compiles in fast mode), then the median of ``repeats`` steps, the peak taken
    over those same steps (printed with ``label`` as soon as measured)."""
    step, batch = (build or _reward_step)(mode, full, device)
    cuda = device.type == "cuda"
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = median_time(step, repeats=repeats, warmup=0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del step
    gc.collect()
    if cuda:
        torch._dynamo.reset()  # compiled graphs hold their module's weights
        torch.cuda.empty_cache()
    memory = "" if peak is None else f", peak {peak:.2f} GiB"
    print(f"[bench] {label}, {mode}: {seconds / batch:.4g} s/sample{memory}", file=sys.stderr, flush=True)
    return seconds / batch, peak


def _device(quick: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")


REFERENCE_SD15 = (6.9 / 8, 30.3)
"""The reference's own reward step (SPEC §8: its loop and LoRA code on one H100, bf16, SD1.5 shapes,
batch 8, ct5f 480, K = 5): seconds per sample and peak GiB. ``--mode reference`` must land within
10 % of both on the same card class."""


def _decode_row(device: torch.device) -> Result:
    """Peak memory beyond the weights of one batch-8 SD1.5 VAE decode with gradient and its backward
    (512 px, bf16 weights): under autocast (how this bench ran the whole loss until issue 20, which
    made its ``--mode reference`` hold 44.4 GiB against the reference's 30.3) vs plain bf16 (the
    trainer and the reference: autocast only inside the UNet). CUDA only."""
    from diffusers import AutoencoderKL

    from training.families import family_named

    torch.manual_seed(0)
    with device:
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(family_named("sd15").configs, subfolder="vae"))
    vae = vae.to(torch.bfloat16).eval().requires_grad_(False)

    def peak(autocast: bool) -> float:
        z = torch.randn(8, 4, 64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            image = vae.decode(z).sample
        image.float().mean().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30

    under, plain = peak(True), peak(False)
    del vae
    gc.collect()
    torch.cuda.empty_cache()
    return Result("VAE decode + backward b8 512px, peak beyond weights: autocast vs bf16", under, plain, "G",
                  "report", None, note="the bench ran the whole reward loss under autocast before issue 20")


def run(quick: bool) -> list[Result]:
    """SD1.5 reward step: fast vs ``--mode reference`` (on a GPU the reference and decode rows are
    printed before the fast mode compiles, so a run cut short keeps them; ``sampling.checkpoint_calls``
    is :mod:`.train_low`'s)."""
    device = _device(quick)
    cuda = device.type == "cuda"
    repeats = 2
    ref_time, ref_mem = _measure("reference", not quick, device, repeats)
    if cuda:
        decode = _decode_row(device)
        print(f"[bench] {decode.name}: {decode.ours:.2f} vs {decode.baseline:.2f} GiB", file=sys.stderr, flush=True)
    fast_time, fast_mem = _measure("fast", not quick, device, 3 if cuda else repeats)
    where = "SD1.5 shapes, bf16, 512px, batch 8, ct5f 480" if not quick else "tiny preset, CPU, batch 2, 6 steps, K 2"
    results = [Result(f"reward step s/sample ({where})", fast_time, ref_time, "s", "<= 0.5x",
                      (fast_time / ref_time <= 0.5) if cuda else None,
                      note=f"samples/s {1 / fast_time:.3g} vs {1 / ref_time:.3g}: speed-up {ref_time / fast_time:.2f}x")]
    if not cuda:
        return results + [Result("reward step peak GPU memory", float("nan"), float("nan"), "G", "<= 0.5x", None,
                                 note="not measured: no GPU in this run")]
    ref_s, ref_gib = REFERENCE_SD15
    results += [
        Result("reward step peak GPU memory", fast_mem, ref_mem, "G", "<= 0.5x", fast_mem / ref_mem <= 0.5),
        Result("reward step, --mode reference / the reference (SPEC 8), s/sample", ref_time, ref_s, "s",
               "0.9-1.1x", abs(ref_time / ref_s - 1) <= 0.1, note=f"{ref_time * 8:.2f} vs 6.9 s per step"),
        Result("reward step, --mode reference / the reference (SPEC 8), peak", ref_mem, ref_gib, "G",
               "0.9-1.1x", abs(ref_mem / ref_gib - 1) <= 0.1),
        decode,
    ]
    return results


if __name__ == "__main__":
    print(json.dumps([r.as_dict() for r in run(quick=True)], indent=2))
