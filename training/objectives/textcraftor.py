"""``--objective textcraftor``: end-to-end fine-tuning of the CLIP text encoder on rewards
(TextCraftor, Li et al., CVPR 2024; SPEC §5). The UNet stays frozen; prompts only.

Per batch of prompts ``p`` (fresh noise every step), the one sampling loop
(:func:`..sampling.sample_x0`, DDIM 25 steps, eta 0, CFG 7.5) runs the first ``T - K`` = 20 steps
without gradient on the **original** encoder's conditioning ``(E_orig(p), E_orig(""))`` and the last
``K`` = 5 with gradient on the fine-tuned encoder's ``(E_ft(p), E_ft(""))``; the final ``x0`` is
decoded with gradient and scored (:mod:`..scoring`: ``f = E / |E|``, every image feature from the
same crop/resize/normalisation as the LongAlign reward):

    L = - 100 w_clip mean_b cos(f_I,b, f_T,b)                 CLIP score (paper: OpenCLIP ViT-g-14)
        -     w_pick mean_b logit_scale f_T,b . f_I,b         PickScore, the diagonal (the released
                                                              code averages the whole B x B matrix)
        - 100 w_hps  mean_b f_T,b . f_I,b                     HPSv2 (OpenCLIP ViT-H-14)
        -   3 w_aes  mean_b aesthetic(f_I,b)                  MLP head on OpenAI CLIP ViT-L/14 features

with script weights w_clip 0.5, w_pick 1, w_hps 1, w_aes 1 (the appendix writes 100 / 1 / 1 / 100
with the factors folded in); AdamW lr 1e-6, no gradient clipping. Text features are the scorer
library's (the mean of a prompt's sentence features), re-normalised here so every term is a cosine.
The gradient calls run on a detached input like every objective of the shared loop; the gradient
reaches ``E_ft`` through each of the K UNet calls' context. The padding rows of the segment
conditioning (``model.token_length`` > 77) keep the original encoder's pad embedding. On SDXL both
text encoders (CLIP-L and bigG) take the LoRA, saved as ``lora_te1_*`` and ``lora_te2_*``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..aesthetic import AestheticHead
from ..conditioning import TextConditioner
from ..lora import adapters_disabled, text_encoder_diff_state_dict, text_encoder_kohya_state_dict
from ..reward_models import PreferenceModel
from ..safe_io import save_tensors
from ..sampling import DDIM, Denoiser, sample_x0
from ..scoring import image_features, text_features
from .reward import RewardObjective

TERM_FACTORS = {"clip": 100.0, "pick": 1.0, "hps": 100.0, "aesthetic": 3.0}
"""The released script's fixed factor of each reward term (SPEC §5)."""
LORA_FILE = "text_encoder_lora.safetensors"
DIFF_FILE = "text_encoder_diff.safetensors"


@dataclass
class RewardTerm:
    """One reward: ``name`` in :data:`TERM_FACTORS`, its model, its weight ``w``; ``head`` for the
    aesthetic term."""

    name: str
    model: PreferenceModel
    weight: float
    head: AestheticHead | None = None

    def reward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Per-image reward ``(B,)`` before weight and factor."""
        f_I = image_features(self.model, images)
        if self.name == "aesthetic":
            return self.head(f_I)
        f_T = F.normalize(text_features(self.model, captions), dim=-1)
        cos = (f_T.to(f_I) * f_I).sum(dim=-1)
        return cos * self.model.logit_scale if self.name == "pick" else cos


ENCODERS = ("text_encoder", "text_encoder_2")
"""The backend's text encoders that train, in ``[L | G]`` order (SDXL has both)."""
COMFY_CLIPS = ("clip_l", "clip_g")
"""ComfyUI's name of each, for a full fine-tune's ``.diff`` keys."""


class TrainableTextEncoder(torch.nn.Module):
    """The fine-tuned encoders as the trainer's extra module: ``forward(captions)`` is the conditioning
    (through this module, so a DDP wrapper sees the call); ``save_pretrained(folder)`` writes the file
    ComfyUI's LoraLoader applies to CLIP (LoRA under the family's ``prefixes``: ``lora_te_*``, SDXL
    ``lora_te1_*`` and ``lora_te2_*``; or ``.diff`` weights for a full fine-tune)."""

    def __init__(self, conditioner: TextConditioner, mode: str, alpha: float, metadata: dict[str, str],
                 prefixes: tuple[str, ...] = ("lora_te_",)):
        super().__init__()
        if mode not in ("lora", "full"):
            raise ValueError(f"textcraftor.train must be 'lora' or 'full', got {mode!r}")
        backend = conditioner.backend
        self.names = [n for n in ENCODERS if getattr(backend, n, None) is not None]
        if len(prefixes) != len(self.names):
            raise ValueError(f"{len(self.names)} text encoders but LoRA prefixes {prefixes}")
        for name in self.names:
            setattr(self, name, getattr(backend, name))
        self.conditioner, self.mode, self.alpha, self.metadata, self.prefixes = conditioner, mode, alpha, metadata, prefixes
        self.frozen: TextConditioner | None = None
        if mode == "full":  # E_orig: frozen copies (a plain attribute: not trained, not checkpointed)
            frozen = copy.copy(backend)
            for name in self.names:
                setattr(frozen, name, copy.deepcopy(getattr(backend, name)).requires_grad_(False))
            self.frozen = TextConditioner(frozen, conditioner.options.token_length, conditioner.t5, conditioner.pooled)

    def forward(self, captions: list[str]) -> torch.Tensor:
        """``E_ft(captions)`` with gradient into the trained parameters."""
        return self.conditioner(captions)

    @torch.no_grad()
    def original(self, captions: list[str]) -> torch.Tensor:
        """``E_orig(captions)``: the LoRA switched off, or the frozen copy of a fully trained encoder."""
        if self.frozen is not None:
            return self.frozen(captions)
        with adapters_disabled(self):
            return self.conditioner(captions)

    def save_pretrained(self, folder: str) -> str:
        tensors: dict[str, torch.Tensor] = {}
        for name, prefix, clip in zip(self.names, self.prefixes, COMFY_CLIPS):
            encoder = getattr(self, name)
            if self.frozen is not None:
                original = dict(getattr(self.frozen.backend, name).named_parameters())
                tensors.update(text_encoder_diff_state_dict(encoder, original, clip=clip))
            else:
                tensors.update(text_encoder_kohya_state_dict(encoder, self.alpha, prefix=prefix))
        file = DIFF_FILE if self.frozen is not None else LORA_FILE
        return save_tensors(tensors, f"{folder}/{file}", metadata={"longalign.objective": "textcraftor", **self.metadata})


class TextCraftorObjective(RewardObjective):
    """See the module docstring. ``encoder`` is the :class:`TrainableTextEncoder` (replaced by the
    trainer's wrapped copy through :meth:`adopt`)."""

    def __init__(self, denoiser: Denoiser, vae, scheduler, encoder: TrainableTextEncoder, terms: list[RewardTerm],
                 latent_shape: tuple[int, int, int], steps: int, guidance: float, grad_steps: int,
                 weight_dtype: torch.dtype, solver: DDIM | None = None):
        if not terms:
            raise ValueError("textcraftor: every reward weight is 0; expected at least one of textcraftor.w_clip, "
                             "w_pick, w_hps, w_aes > 0")
        if not 1 <= grad_steps <= steps:
            raise ValueError(f"textcraftor: sampling.grad_steps must be in [1, {steps}] (the last steps run the "
                             f"fine-tuned encoder), got {grad_steps}")
        super().__init__(denoiser, vae, scheduler, encoder.conditioner, terms[0].model, latent_shape, steps, guidance,
                         grad_steps, 1.0, None, weight_dtype, solver=solver)
        self.encoder, self.raw_encoder, self.terms = encoder, encoder, terms

    def adopt(self, modules: list[torch.nn.Module]) -> None:
        self.encoder = modules[0]

    def rewards(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, per-term mean rewards)`` of decoded images in [0, 1]."""
        loss = images.new_zeros(())
        logs = {}
        for term in self.terms:
            r = term.reward(images, captions).mean()
            loss = loss - TERM_FACTORS[term.name] * term.weight * r
            logs[term.name] = r.detach()
        return loss, logs

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        captions = list(batch["caption"])
        B = len(captions)
        device = self.vae.device
        original = self.raw_encoder.original(captions + [""]).to(self.weight_dtype)
        tuned = self.encoder(captions + [""]).to(self.weight_dtype)
        late = (tuned[:B], tuned[B:])
        switch = self.steps - self.K
        self.ddim.alphas_cumprod = self.ddim.alphas_cumprod.to(device)
        noise = torch.randn((B, *self.latent_shape), generator=generator, device=device, dtype=self.weight_dtype)
        x0 = sample_x0(self.denoiser, noise, original[:B], original[B:], self.ddim, self.steps, self.guidance,
                       list(range(switch, self.steps)), context_at=lambda i: late if i >= switch else None,
                       generator=generator)
        loss, logs = self.rewards(self.decode(x0), captions)
        return loss, {"reward": -loss.detach(), **logs}


def load_reward_terms(cfg, tiny: bool, device: torch.device, dtype: torch.dtype) -> list[RewardTerm]:
    """The reward terms with weight > 0 from ``cfg`` (:class:`..config.TextCraftorConfig`); with
    ``tiny``, a term without a model file gets a tiny random CLIP (and head)."""
    from ..aesthetic import AestheticHead, load_aesthetic_head
    from ..reward_models import load_reward_model
    from ..safe_io import ModelFileError
    from ..tiny import tiny_reward_model

    specs = [("clip", cfg.w_clip, cfg.clip_model, cfg.clip_kind, cfg.clip_arch, "clip_model"),
             ("pick", cfg.w_pick, cfg.pick_model, "pickscore", "ViT-H-14", "pick_model"),
             ("hps", cfg.w_hps, cfg.hps_model, "hpsv2", cfg.hps_arch, "hps_model"),
             ("aesthetic", cfg.w_aes, cfg.aesthetic_clip, cfg.aesthetic_kind, cfg.aesthetic_arch, "aesthetic_clip")]
    terms = []
    for seed, (name, weight, path, kind, arch, key) in enumerate(specs):
        if weight == 0:
            continue
        if path:
            model = load_reward_model(path, kind, device, dtype, arch)
        elif tiny:
            model = tiny_reward_model(seed)
            model.model.to(device)
        else:
            raise ModelFileError(f"textcraftor.{key} is not set: the {name} reward needs a local model "
                                 f"(or set textcraftor.w_{'aes' if name == 'aesthetic' else name} 0)")
        head = None
        if name == "aesthetic":
            dim = image_features(model, torch.zeros(1, 3, 8, 8, device=device)).shape[1]
            if cfg.aesthetic_head:
                head = load_aesthetic_head(cfg.aesthetic_head, dim, device)
            elif tiny:
                torch.manual_seed(seed)
                head = AestheticHead([torch.nn.Linear(dim, 1)]).to(device)
            else:
                raise ModelFileError("textcraftor.aesthetic_head is not set: the aesthetic reward needs the head's "
                                     "safetensors file (or set textcraftor.w_aes 0)")
        terms.append(RewardTerm(name, model, weight, head))
    return terms
