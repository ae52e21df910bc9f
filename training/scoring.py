"""Decomposed preference scoring (LongAlign, SPEC §3): one scorer for the nodes and the reward stage.

Features (exactly as the reference computes them):

    f_I = E_I(x) / |E_I(x)|                              image feature, L2-normalised
    f_T = (1/n) sum_i E_T(s_i) / |E_T(s_i)|              caption = sentences s_1..s_n, plain mean,
                                                         NOT re-normalised
    s   = f_T . f_I                                      no logit scale (PickScore-style numbers
                                                         are logit_scale * s, see ``total_scaled``)

Decomposition along the common direction ``v`` of text features:

    v        = mean(f_T) / |mean(f_T)|                   over the batch (gathered over processes),
                                                         a reference prompt file, or the built-in set
    eta      = f_T . v
    f_T_perp = f_T - eta v
    s        = eta (v . f_I)      +  f_T_perp . f_I
               text-irrelevant       text-relevant
    s_w      = f_T_perp . f_I + w eta (v . f_I)          (reference w = 0.3; w = 1 gives s back,
                                                          w = 0 keeps only the alignment part)
    loss     = 0.5 (1 - mean s_w)

Images arrive as ``(B, 3, H, W)`` in [0, 1] and are preprocessed differentiably: a square crop of
504/512 of the shorter side (random offset in training, centred in evaluation), bilinear
(antialiased) resize to the model's input size (224 for ViT-H-14), CLIP mean/std.
1-channel images are repeated to RGB and a 4th (alpha) channel is dropped; other channel counts
are refused. The reward model is frozen: gradients reach the image only.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from .reward_models import PreferenceModel
from .reward_names import DIRECTION_SOURCES, REFERENCE_W
from .segments import split_sentences
from .transfer import to_device

CROP_FRACTION = 504 / 512
TEXT_CHUNK = 256
"""Sentences per text-encoder forward (bounds memory when scoring thousands of prompts)."""
DEFAULT_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "reference_prompts.txt")
DirectionSource = Literal["batch", "reference", "builtin"]
SCORE_FIELDS = ("reweighted", "total", "text_relevant", "text_irrelevant", "eta", "total_scaled")
Gather = Callable[[torch.Tensor], torch.Tensor]
"""Concatenates a tensor over all processes along dim 0 (e.g. ``accelerator.gather``)."""


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a text file: one per line; blank lines and ``#`` comments are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist (expected a text file, one prompt per line)")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text (it holds the byte {e.object[e.start]:#04x}); "
                         "save it as UTF-8, one prompt per line") from None
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts (one prompt per line expected)")
    return prompts


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` with C = 3; C = 1 is repeated (grey), C = 4 loses its alpha channel."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor in [0, 1], got {shape}")
    b, c, h, w = images.shape
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    if c == 4:
        return images[:, :3]
    raise ValueError(f"images must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {c} "
                     f"(shape {tuple(images.shape)}; channels come second)")


def preprocess_images(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                      train: bool = False, generator: torch.Generator | None = None,
                      crop_fraction: float = CROP_FRACTION, mode: str = "bilinear") -> torch.Tensor:
    """Crop, resize and normalise ``(B, C, H, W)`` images in [0, 1] to ``(B, 3, size, size)``.

    Crop: a square of side ``round(crop_fraction * min(H, W))`` (504 of a 512 image, as the reference;
    CoMat's captioner: 510), one random offset for the batch when ``train`` else centred; ``mode``:
    the (antialiased) resize. Differentiable in ``images``.
    """
    images = to_rgb(images)
    h, w = images.shape[-2:]
    side = max(1, round(crop_fraction * min(h, w)))
    if train:
        where = generator.device if generator is not None else None  # a CUDA generator draws on CUDA
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator, device=where))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator, device=where))
    else:
        top, left = (h - side) // 2, (w - side) // 2
    crop = images[:, :, top: top + side, left: left + side].float()
    resized = F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)
    mean_t = to_device(mean, resized.device).view(1, 3, 1, 1)
    std_t = to_device(std, resized.device).view(1, 3, 1, 1)
    return (resized - mean_t) / std_t


def image_features(model: PreferenceModel, images: torch.Tensor | Sequence[torch.Tensor], train: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``f_I = E_I(x) / |E_I(x)|``, ``(B, D)`` float32. ``images``: one ``(B, C, H, W)`` batch, or a
    list of ``(C, H, W)`` images of any sizes (each cropped and resized on its own)."""
    if len(images) == 0:
        raise ValueError("images is empty: give at least one image")
    prep = lambda x: preprocess_images(x, model.image_size, model.mean, model.std, train, generator)  # noqa: E731
    if isinstance(images, torch.Tensor):
        pixels = prep(images.to(model.device))
    else:
        pixels = torch.cat([prep(x.to(model.device).unsqueeze(0)) for x in images])
    return F.normalize(model.encode_image(pixels).float(), dim=-1)


def caption_sentences(texts: Sequence[str]) -> list[list[str]]:
    """The sentences each caption is scored as (:func:`.segments.split_sentences`); empty text is refused."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of prompts, not a single string")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} is empty: a preference score compares an image with its prompt, "
                             "so every image needs a non-empty prompt")
        out.append(split_sentences(text))
    return out


@torch.no_grad()
def text_features(model: PreferenceModel, texts: Sequence[str]) -> torch.Tensor:
    """``f_T = (1/n) sum_i E_T(s_i) / |E_T(s_i)|`` per caption, ``(N, D)`` float32, not re-normalised.

    Each distinct caption is encoded once; all sentences go through the text tower in chunks of
    :data:`TEXT_CHUNK`; a sentence longer than 75 tokens is truncated (reference).
    """
    unique = list(dict.fromkeys(texts))
    sentences = caption_sentences(unique)
    flat = [s for group in sentences for s in group]
    owner = to_device([i for i, group in enumerate(sentences) for _ in group], model.device)
    feats = torch.cat([
        F.normalize(model.encode_text(model.tokenize(flat[i: i + TEXT_CHUNK])).float(), dim=-1)
        for i in range(0, len(flat), TEXT_CHUNK)
    ])
    sums = torch.zeros(len(unique), feats.shape[1], device=feats.device).index_add_(0, owner, feats)
    counts = to_device([len(group) for group in sentences], feats.device).unsqueeze(1)  # bincount would sync
    f_T = sums / counts
    if len(unique) == len(texts):  # all distinct: already in order
        return f_T
    index = {t: i for i, t in enumerate(unique)}
    return f_T[to_device([index[t] for t in texts], f_T.device)]


def common_direction(f_T: torch.Tensor) -> torch.Tensor:
    """``v = mean(f_T) / |mean(f_T)|``, shape ``(D,)``."""
    return F.normalize(f_T.mean(dim=0), dim=0)


def reference_direction(model: PreferenceModel, reference: str | Sequence[str] | None = None) -> torch.Tensor:
    """``v`` of a fixed prompt set: a prompt file path, a list of prompts, or None for the built-in set
    (:data:`DEFAULT_PROMPTS`). Text features of a set are cached on the model."""
    if reference is None or isinstance(reference, str):
        prompts = tuple(read_prompt_file(reference or DEFAULT_PROMPTS))
    else:
        prompts = tuple(reference)
    if prompts not in model.text_cache:
        model.text_cache[prompts] = text_features(model, prompts)
    return common_direction(model.text_cache[prompts])


@dataclass
class Direction:
    """The common direction used, where it came from, and why (when a fallback happened)."""

    v: torch.Tensor
    source: DirectionSource
    note: str = ""


def resolve_direction(model: PreferenceModel, source: DirectionSource, f_T: torch.Tensor,
                      reference: str | Sequence[str] | None = None, gather: Gather | None = None) -> Direction:
    """``v`` from ``source``: ``batch`` (``f_T``, gathered with ``gather`` when given), ``reference``
    (the prompts or prompt file ``reference``) or ``builtin`` (the shipped set).

    A batch direction needs two different prompts: with one (a batch of one, or B copies of one
    prompt) ``v`` would be ``f_T`` itself and the text-relevant part 0, so the reference set
    (``reference`` if given, else the built-in one) is used instead and ``note`` says so.
    """
    if source not in DIRECTION_SOURCES:
        raise ValueError(f"direction source must be one of {', '.join(DIRECTION_SOURCES)}, got {source!r}")
    if source == "reference" and reference is None:
        raise ValueError("direction source 'reference' needs a reference prompt file (or list of prompts)")
    if source == "batch":
        batch = gather(f_T) if gather is not None else f_T
        if batch.shape[0] >= 2 and not torch.allclose(batch, batch[:1].expand_as(batch), atol=1e-6, rtol=0):
            return Direction(common_direction(batch), "batch")
        fallback: DirectionSource = "reference" if reference is not None else "builtin"
        note = (f"batch direction undefined: the batch holds {batch.shape[0]} text feature(s) of a single prompt; "
                f"used the {fallback} prompt set instead")
        warnings.warn(note, stacklevel=3)
        return Direction(reference_direction(model, reference if fallback == "reference" else None), fallback, note)
    return Direction(reference_direction(model, reference if source == "reference" else None), source)


@dataclass
class DecomposedScores:
    """Per-image scores, each ``(B,)`` float32 (see the module docstring for the formulas)."""

    total: torch.Tensor
    """s = f_T . f_I"""
    text_relevant: torch.Tensor
    """f_T_perp . f_I"""
    text_irrelevant: torch.Tensor
    """eta (v . f_I)"""
    reweighted: torch.Tensor
    """s_w = f_T_perp . f_I + w eta (v . f_I)"""
    eta: torch.Tensor
    """f_T . v"""
    w: float
    direction: Direction
    logit_scale: float = 1.0

    @property
    def total_scaled(self) -> torch.Tensor:
        """logit_scale * s: PickScore-style numbers (about 100 * s for CLIP-family checkpoints)."""
        return self.total * self.logit_scale

    def order(self, score: str = "reweighted") -> list[int]:
        """Image indices sorted by ``score`` (a field name), best first; ties keep batch order. A
        non-finite score (NaN or inf: a NaN or black decode of an fp16 VAE) ranks last, never first."""
        values = getattr(self, score, None)
        if score not in SCORE_FIELDS or values is None:
            raise ValueError(f"score must be one of {', '.join(SCORE_FIELDS)}, got {score!r}")
        values = values.detach().float()
        key = torch.where(torch.isfinite(values), values, torch.full_like(values, -float("inf")))
        return torch.sort(key, descending=True, stable=True).indices.tolist()

    def nonfinite(self) -> list[int]:
        """Indices of the images with a NaN or infinite score in any field."""
        values = torch.stack([getattr(self, k).detach().float() for k in SCORE_FIELDS])
        return (~torch.isfinite(values).all(dim=0)).nonzero().flatten().tolist()

    def summary(self) -> dict:
        """Plain-Python lists and means, for strict JSON: a non-finite score is ``None`` (null), its
        image listed in ``nonfinite`` and left out of the means (``None`` when no score is finite)."""
        rows = {k: [_finite_or_none(x) for x in getattr(self, k).detach().float().cpu().tolist()] for k in SCORE_FIELDS}
        means = {k: _mean([x for x in v if x is not None]) for k, v in rows.items()}
        return {"w": self.w, "direction": self.direction.source, "note": self.direction.note,
                "logit_scale": _finite_or_none(self.logit_scale), "mean": means, "nonfinite": self.nonfinite(), **rows}

    def select(self, score: str = "reweighted", top_k: int | None = None,
               min_score: float | None = None) -> tuple[list[int], list[int]]:
        """Best-of-N: ``(chosen, rejected)`` image indices, both best first. Chosen are the first
        ``top_k`` of :meth:`order` (all without ``top_k``) whose ``score`` is finite and at least
        ``min_score``; rejected are all the others."""
        order = self.order(score)
        values = getattr(self, score).detach().float()
        chosen = [i for i in order if torch.isfinite(values[i]) and (min_score is None or values[i] >= min_score)]
        chosen = chosen[:top_k] if top_k is not None else chosen
        kept = set(chosen)
        return chosen, [i for i in order if i not in kept]

    def ranking(self, score: str = "reweighted", top_k: int | None = None, min_score: float | None = None) -> dict:
        """The batch ranked by ``score`` (:meth:`order`) for strict JSON: ``order``, the ranked
        ``scores`` and the four score lists in batch order, non-finite values as ``None`` and their
        images listed in ``nonfinite``; ``chosen`` and ``rejected`` as :meth:`select` gives them."""
        order = self.order(score)
        chosen, rejected = self.select(score, top_k, min_score)
        rows = self.summary()
        return {"score": score, "order": order, "scores": [rows[score][i] for i in order],
                "chosen": chosen, "rejected": rejected, "min_score": min_score,
                "nonfinite": rows["nonfinite"], "direction": rows["direction"], "note": rows["note"],
                **{k: rows[k] for k in ("total", "text_relevant", "text_irrelevant", "reweighted")}}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def check_weight(w: float) -> float:
    """``w`` as a float, refused (ValueError) unless a finite number: NaN would make every s_w NaN."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"w must be a finite number (the weight of the text-irrelevant part, e.g. {REFERENCE_W}), got {w!r}")
    return float(w)


def decompose(f_T: torch.Tensor, f_I: torch.Tensor, direction: Direction, w: float = REFERENCE_W,
              logit_scale: float = 1.0) -> DecomposedScores:
    """Split ``s = f_T . f_I`` along ``v`` (``f_T``: ``(B, D)`` or ``(1, D)`` for all images)."""
    v = direction.v.to(f_I)
    f_T = f_T.to(f_I).expand_as(f_I)
    eta = f_T @ v
    f_T_perp = f_T - eta.unsqueeze(1) * v
    relevant = (f_T_perp * f_I).sum(dim=-1)
    irrelevant = eta * (f_I @ v)
    w = check_weight(w)
    return DecomposedScores((f_T * f_I).sum(dim=-1), relevant, irrelevant, relevant + w * irrelevant,
                            eta, w, direction, logit_scale)


def score_images(model: PreferenceModel, images: torch.Tensor | Sequence[torch.Tensor], texts: Sequence[str],
                 w: float = REFERENCE_W, direction: DirectionSource = "batch",
                 reference: str | Sequence[str] | None = None, gather: Gather | None = None,
                 train: bool = False, generator: torch.Generator | None = None) -> DecomposedScores:
    """Decomposed scores of ``images`` against ``texts`` (one text per image, or one for all).

    Differentiable in ``images``; ``train`` selects the random crop. See :func:`resolve_direction`
    for ``direction``, ``reference`` and ``gather``.
    """
    n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if len(texts) not in (1, n):
        raise ValueError(f"got {n} images and {len(texts)} texts: give one text per image, or one for all")
    f_I = image_features(model, images, train, generator)  # queued first: the text work overlaps it
    f_T = text_features(model, texts)
    v = resolve_direction(model, direction, f_T, reference, gather)
    return decompose(f_T, f_I, v, w, model.logit_scale)


def reward_loss(scores: DecomposedScores) -> torch.Tensor:
    """``0.5 (1 - mean s_w)`` (the reference's extra ``- 0.09 (1 - w)`` is a constant and left out)."""
    return 0.5 * (1.0 - scores.reweighted.mean())

