"""CoMat's concept matching (Jiang et al., NeurIPS 2024; SPEC §6): an image captioner scores how
likely the prompt is as a caption of the generated image.

Captioner: BLIP image-captioning (``BlipForConditionalGeneration``; CoMat uses
blip-image-captioning-large, fp16, frozen) from a local folder. For images ``x`` in [0, 1] and
prompts ``p``:

    x' = normalise_CLIP(resize_bicubic(crop(x), 384))        crop: 510 of 512 (random offset)
    y  = tokens("a photography of " + lower(p))               BERT WordPiece, padded to the longest
    r  = - (1 / |S|) sum_{(b, j) in S} CE_0.1(logits_{b, j-1}, y_{b, j})
    L_concept = - r

``S``: every token position that is neither padding nor part of the prefix (the labels there are
-100); ``CE_0.1``: cross-entropy with label smoothing 0.1; the mean runs over all counted tokens of
the batch (transformers' ``reduction="mean"``). ``r`` is differentiable in ``x``; the captioner's
own parameters never get gradients.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .reward_models import CLIP_MEAN, CLIP_STD
from .safe_io import ModelFileError, load_json_object, load_pretrained_folder
from .scoring import preprocess_images

CAPTION_PREFIX = "a photography of "
IGNORE_INDEX = -100
LABEL_SMOOTHING = 0.1
CROP_FRACTION = 510 / 512
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class Captioner:
    """A frozen BLIP captioner and its tokenizer (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer, path: str = "<memory>"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.path = tokenizer, path
        self.image_size = int(model.config.vision_config.image_size)
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        """Longer captions are truncated (BLIP's text positions)."""
        self.prefix_length = len(tokenizer(CAPTION_PREFIX.strip()).input_ids) - 1
        """Tokens of the prefix with the start token, without the end token (reference)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` captioner input of images in [0, 1]; random crop when ``generator`` is given."""
        return preprocess_images(images, self.image_size, CLIP_MEAN, CLIP_STD, train=generator is not None,
                                 generator=generator, crop_fraction=CROP_FRACTION, mode="bicubic")

    def text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, labels)``; labels are -100 on padding and on the prefix."""
        enc = self.tokenizer([CAPTION_PREFIX + p.lower() for p in prompts], padding="longest", truncation=True,
                             max_length=self.max_tokens, return_tensors="pt")
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[:, : self.prefix_length] = IGNORE_INDEX
        return ids, mask, labels

    def token_count(self, prompts: Sequence[str]) -> int:
        """``|S|``: the counted (prompt) tokens of the batch."""
        return int((self.text(prompts)[2][:, 1:] != IGNORE_INDEX).sum())

    def token_losses(self, images: torch.Tensor, prompts: Sequence[str], generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """``(B,)``: each image's sum of the smoothed cross-entropies of its prompt's tokens. BLIP's text
        decoder is causal, so a token's loss does not depend on how far the batch is padded: these sums
        over chunks of a batch add up to the whole batch's."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"captioner: {images.shape[0]} images but {len(prompts)} prompts")
        pixels = self.pixels(images.to(self.device), generator).to(self.model.dtype)
        ids, mask, labels = self.text(prompts)
        logits = self.model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                             label_smoothing=LABEL_SMOOTHING, reduction="none")  # 0 where ignored
        return ce.sum(dim=1)

    def reward(self, images: torch.Tensor, prompts: Sequence[str], generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """``r``: minus the mean smoothed token cross-entropy of ``prompts`` given ``images`` (scalar)."""
        return -self.token_losses(images, prompts, generator).sum() / self.token_count(prompts)


def load_captioner(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Captioner:
    """A :class:`Captioner` from a local BLIP folder (``config.json`` with ``model_type`` "blip", weights
    as ``model.safetensors`` or weights-only ``pytorch_model.bin``, and the tokenizer files)."""
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    what = f"comat.captioner {path!r}"
    if not os.path.isdir(path):
        raise ModelFileError(f"{what}: expected a folder holding a BLIP captioner (config.json, model.safetensors, "
                             "tokenizer files), e.g. a local copy of blip-image-captioning-large")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelFileError(f"{what}: config.json is missing; expected a BLIP captioner folder")
    model_type = load_json_object(config_file, what).get("model_type")
    if model_type != "blip":
        raise ModelFileError(f"{what}: its config.json has model_type {model_type!r}, expected 'blip' "
                             "(BlipForConditionalGeneration, e.g. blip-image-captioning-large)")
    if not set(os.listdir(path)) & set(WEIGHT_FILES):
        raise ModelFileError(f"{what}: no weights; expected one of {', '.join(WEIGHT_FILES)}")
    model = load_pretrained_folder(BlipForConditionalGeneration, path, what, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... by case
        raise ModelFileError(f"{what}: the tokenizer could not be read (tokenizer files missing or damaged): {e}") from e
    return Captioner(model.to(device), tokenizer, path)
