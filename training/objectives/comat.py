"""``--objective comat``: concept matching, attribute concentration and fidelity preservation
(CoMat, Jiang et al., NeurIPS 2024; SPEC §6). The UNet LoRA trains; prompts only.

Per batch of prompts ``p`` (fresh noise), the one sampling loop (:func:`..sampling.sample_x0`: 50 DDIM
steps, CFG 7.5, K = 5 gradient calls at ``offset + 10 k``) gives the final latent ``z = x0``, decoded
with gradient to the image ``x`` in [0, 1]. With ``r`` the captioner's reward (:mod:`..captioner`),
``L_token`` / ``L_pixel`` from the cross-attention maps of ``attn_steps`` = 2 of the K gradient calls
(:mod:`..attention_maps`, groups from :mod:`..concepts`) and ``G_adv`` from the latent discriminator
(:mod:`..discriminator`):

    L = - w_concept r + w_adv G_adv + w_token L_token + w_pixel L_pixel
    (SPEC §6: w_concept 1, w_adv 1 for SD1.5, w_token 1e-3, w_pixel 5e-5)

A term with weight 0 is off and nothing of it is computed or loaded (no captioner, no attention
capture, no discriminator). The discriminator's own step runs **inside** :meth:`CoMatObjective.loss`,
before the generator's adversarial term: ``D`` is updated once on this step's detached ``z`` and the
real latents of the same prompts, then ``G_adv`` is taken against the updated ``D`` (the trainer's
backward comes after ``loss`` returns, and ``D``'s weights must not change between a forward and its
backward). Real latents come from the base model (LoRA off) on the same prompt, 50 steps, CFG 7.5,
noise seeded by the prompt, generated the first time a prompt is met and kept on the host (the
reference generates them all beforehand: the same latents, spread over training).
"""
from __future__ import annotations

import hashlib

import torch

from ..attention_maps import AttentionStore, Group, RecordingDenoiser, concentration_losses
from ..captioner import Captioner
from ..concepts import token_groups
from ..conditioning import TextConditioner
from ..denoisers import CheckpointedUNet
from ..discriminator import DiscriminatorTrainer
from ..lora import adapters_disabled
from ..sampling import DDIM, Denoiser, gradient_step_indices, sample_x0
from .reward import ChunkedDecodeScore, RewardObjective, replayed_generator


class RealLatents:
    """``z_real`` of a prompt: the base model's sample (LoRA off), cached on the host."""

    def __init__(self, unet: torch.nn.Module, ddim: DDIM, latent_shape: tuple[int, int, int], steps: int,
                 guidance: float):
        self.unet = getattr(unet, "module", unet)
        self.base = CheckpointedUNet(self.unet)
        self.ddim, self.latent_shape, self.steps, self.guidance = ddim, latent_shape, steps, guidance
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str], cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        device = cond.device
        todo = [i for i, c in enumerate(captions) if c not in self.cache]
        if todo:
            noise = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(
                int.from_bytes(hashlib.sha256(captions[i].encode()).digest()[:7], "little")))
                for i in todo]).to(device, cond.dtype)
            with adapters_disabled(self.unet):
                z = sample_x0(self.base, noise, cond[todo], uncond, self.ddim, self.steps, self.guidance)
            for i, latent in zip(todo, z):
                self.cache[captions[i]] = latent.detach().to("cpu", torch.float16)
        return torch.stack([self.cache[c] for c in captions]).to(device, cond.dtype)


class CoMatObjective(RewardObjective):
    """See the module docstring. Each of ``captioner``, ``store``, ``discriminator`` is None when its
    term's weight is 0. A batch may carry ``masks``: ``masks[b][g]`` an ``(H, W)`` mask (or None) of the
    noun of group ``g`` of :func:`..concepts.token_groups` of caption ``b``; then those groups use it
    instead of the mask-free region, and ``L_pixel`` is computed for them."""

    def __init__(self, denoiser: Denoiser, vae, scheduler, conditioner: TextConditioner,
                 latent_shape: tuple[int, int, int], steps: int, guidance: float, grad_steps: int,
                 weight_dtype: torch.dtype, *, captioner: Captioner | None, w_concept: float,
                 store: AttentionStore | None, w_token: float, w_pixel: float, attn_steps: int, threshold: float,
                 max_group_words: int, discriminator: DiscriminatorTrainer | None, real: RealLatents | None,
                 w_adv: float, solver: DDIM | None = None, decode_chunk: int = 0):
        if w_concept > 0 and captioner is None:
            raise ValueError("comat: w_concept > 0 needs a captioner")
        if (w_token > 0 or w_pixel > 0) and store is None:
            raise ValueError("comat: w_token or w_pixel > 0 needs an attention store")
        if w_adv > 0 and (discriminator is None or real is None):
            raise ValueError("comat: w_adv > 0 needs a discriminator and real latents")
        if not any(w > 0 for w in (w_concept, w_token, w_pixel, w_adv)):
            raise ValueError("comat: every loss weight is 0; expected at least one of comat.w_concept, w_token, "
                             "w_pixel, w_adv > 0")
        if store is not None and not 1 <= attn_steps <= grad_steps:
            raise ValueError(f"comat.attn_steps must be in [1, sampling.grad_steps = {grad_steps}], got {attn_steps}")
        if store is not None:
            denoiser = RecordingDenoiser(denoiser, store)
        super().__init__(denoiser, vae, scheduler, conditioner, None, latent_shape, steps, guidance, grad_steps, 1.0,
                         None, weight_dtype, decode_chunk=decode_chunk, solver=solver)
        self.captioner, self.store, self.d, self.real = captioner, store, discriminator, real
        self.w_concept, self.w_token, self.w_pixel, self.w_adv = w_concept, w_token, w_pixel, w_adv
        self.attn_steps, self.threshold, self.max_group_words = attn_steps, threshold, max_group_words

    def groups(self, captions: list[str]) -> tuple[list[list[int]], list[list[Group]]]:
        """Per caption, the context rows to record and its groups as columns into them."""
        tokens, groups = [], []
        for caption in captions:
            found = token_groups(caption, self.conditioner.backend, self.conditioner.options, self.max_group_words)
            rows = sorted({p for g in found for p in g.all_positions})
            column = {p: i for i, p in enumerate(rows)}
            tokens.append(rows)
            groups.append([Group(tuple(column[p] for p in g.all_positions), tuple(column[p] for p in g.noun_positions))
                           for g in found])
        return tokens, groups

    def concept_reward(self, x0: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        """``r`` of the decoded ``x0``; with ``decode_chunk`` (fast mode) decoded, captioned and
        back-propagated into ``x0`` ``decode_chunk`` images at a time (:class:`.reward.ChunkedDecodeScore`;
        the same numbers: ``r`` is a sum of per-image token losses over the batch's token count; the
        batch's one crop is replayed)."""
        crop = (str(generator.device), generator.get_state())

        def losses(part: torch.Tensor, start: int) -> torch.Tensor:
            return self.captioner.token_losses(self.decode(part), captions[start: start + part.shape[0]],
                                               replayed_generator(crop))

        sums = ChunkedDecodeScore.apply(x0, losses, self.decode_chunk)[0] if self.decode_chunk else losses(x0, 0)
        return -sums.sum() / self.captioner.token_count(captions)

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        captions = list(batch["caption"])
        B = len(captions)
        device = self.vae.device
        with torch.no_grad():
            cond = self.conditioner(captions).to(self.weight_dtype)
            if self._uncond is None:  # frozen encoders: the empty prompt's conditioning never changes
                self._uncond = self.conditioner([""]).to(self.weight_dtype)
        self.ddim.alphas_cumprod = self.ddim.alphas_cumprod.to(device)
        noise = torch.randn((B, *self.latent_shape), generator=generator, device=device, dtype=self.weight_dtype)
        grad_indices = gradient_step_indices(self.steps, self.K, generator)
        groups: list[list[Group]] = []
        if self.store is not None:
            tokens, groups = self.groups(captions)
            chosen = torch.randperm(len(grad_indices), generator=generator, device=generator.device)
            self.store.begin(tokens, sorted(int(i) for i in chosen[: self.attn_steps]))
        x0 = sample_x0(self.denoiser, noise, cond, self._uncond, self.ddim, self.steps, self.guidance, grad_indices,
                       generator=generator)
        loss = x0.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        if self.captioner is not None:
            reward = self.concept_reward(x0, captions, generator)
            loss = loss - self.w_concept * reward
            logs["concept"] = reward.detach()
        if self.store is not None:
            token, pixel = concentration_losses(self.store, groups, batch.get("masks"), self.threshold,
                                                pixel=self.w_pixel > 0)
            loss = loss + self.w_token * token + self.w_pixel * pixel
            logs.update(token=token.detach(), pixel=pixel.detach())
        if self.d is not None:
            real = self.real(captions, cond, self._uncond)
            logs["d_loss"] = self.d.step(x0.detach(), real)
            g_adv = self.d.d.generator_loss(x0)
            loss = loss + self.w_adv * g_adv
            logs["g_adv"] = g_adv.detach()
        return loss, logs
