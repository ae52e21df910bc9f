"""Reward nodes: load a preference model, score images with the decomposed reward, rank a batch.

Glue over :mod:`training.scoring` (the scorer the reward stage trains with). ComfyUI's IMAGE is
``(B, H, W, C)`` in [0, 1]; the library takes ``(B, C, H, W)``. Models live in
``models/reward_models`` (registered with ComfyUI's ``folder_paths``; more folders can be added
under the key ``reward_models`` in ``extra_model_paths.yaml``).
"""
from __future__ import annotations

import json
import os

import torch

from ..training.scoring import (
    DIRECTION_SOURCES, REFERENCE_W, SCORE_FIELDS, DecomposedScores, check_weight, score_images,
)
from ..training.reward_models import REWARD_KINDS, list_reward_models, load_reward_model
from .listing import listed
from .paths import resolve_in

FOLDER = "reward_models"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
W_RANGE = (0.0, 2.0)


def _folder_paths():
    """ComfyUI's ``folder_paths`` with ``reward_models`` registered, or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    return folder_paths


_folder_paths()  # register the folder at import, so /object_info and extra paths know it


def _list_entries() -> list[str]:
    fp = _folder_paths()
    roots = fp.get_folder_paths(FOLDER) if fp else []
    return sorted({e for root in roots for e in list_reward_models(root)})


NO_MODELS = "(none: put Denscore/PickScore folders or HPSv2 .safetensors in models/reward_models)"
"""The one entry of an empty model list: the list itself says what to do."""
WHERE_MODELS = ("put a Denscore or PickScore model (a transformers CLIPModel folder: config.json + model.safetensors) "
                "or an HPSv2/CLIP open_clip checkpoint (.safetensors or .pt) in ComfyUI/models/reward_models "
                "(more folders: the key reward_models in extra_model_paths.yaml), then press R to refresh the list")


def reward_model_entries() -> list[str]:
    """The models of every reward_models folder (a bounded walk, off the event loop: :mod:`.listing`),
    or ``[NO_MODELS]`` when there are none."""
    return listed("models/reward_models", _list_entries, []) or [NO_MODELS]


def resolve_model_path(name: str) -> str:
    fp = _folder_paths()
    roots = fp.get_folder_paths(FOLDER) if fp else []
    if name == NO_MODELS:
        raise FileNotFoundError(f"Reward Model Loader: model_name: there is no reward model yet; {WHERE_MODELS}")
    try:
        return resolve_in(name, "Reward Model Loader: model_name", roots)
    except FileNotFoundError:
        raise FileNotFoundError(f"Reward Model Loader: model_name: {name!r} is not in any reward_models folder "
                                f"({', '.join(roots) or 'none registered'}); {WHERE_MODELS}") from None


def validate_model_name(model_name=None) -> bool | str:
    """``VALIDATE_INPUTS`` for ``model_name``: instead of ComfyUI's "Value not in list" (a workflow
    naming a model this machine lacks, or an empty folder), a message saying where to put which files."""
    if model_name == NO_MODELS:
        return f"there is no reward model yet: {WHERE_MODELS}"
    if model_name is None or model_name in reward_model_entries():
        return True
    return f"{model_name!r} is not in models/reward_models: {WHERE_MODELS}"


def device_choices() -> list[str]:
    """``auto``, ``cpu`` and the accelerators torch sees on this machine (none offered that is absent)."""
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        choices += ["cuda"] + ([f"cuda:{i}" for i in range(count)] if count > 1 else [])
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        choices.append("xpu")
    return choices


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: ComfyUI's torch device; fp32 on CPU, bf16 (or fp16 without bf16 support) on a GPU."""
    if device == "auto":
        try:
            import comfy.model_management

            dev = comfy.model_management.get_torch_device()
        except ImportError:  # the pack imported outside ComfyUI
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dtype != "auto":
        return dev, DTYPES[dtype]
    if dev.type == "cpu":
        return dev, torch.float32
    return dev, torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16


def _reference_path(reference_file: str) -> str | None:
    """A reference prompt file relative to ComfyUI's input folder (or an absolute path inside the
    input or a models folder, :mod:`.paths`); '' = none."""
    if not reference_file.strip():
        return None
    import folder_paths

    return resolve_in(reference_file, "reference_file", [folder_paths.get_input_directory()])


def score_batch(images: torch.Tensor, reward_model, text: str, w: float, direction: str,
                reference_file: str) -> DecomposedScores:
    """The scoring both nodes share: IMAGE ``(B, H, W, C)`` -> :class:`DecomposedScores`."""
    if reward_model is None:
        raise ValueError("the reward_model input is None: connect a Reward Model Loader")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be an IMAGE batch (B, H, W, C), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    return score_images(reward_model, images.movedim(-1, 1), [text], w=check_weight(w), direction=direction,
                        reference=_reference_path(reference_file))


def validate_w(w=None) -> bool | str:
    """ComfyUI's ``VALIDATE_INPUTS`` for ``w``: its own min/max check lets NaN through (every
    comparison with NaN is false), so a prompt sent through the API with ``NaN`` is refused here
    (True, or the message). A linked ``w`` (None here) is checked when the node runs."""
    if w is None:
        return True
    try:
        w = check_weight(w)
    except ValueError as e:
        return str(e)
    low, high = W_RANGE
    return True if low <= w <= high else f"w must be between {low} and {high}, got {w}"


IMAGES_TOOLTIP = "The images to score, e.g. a batch from VAE Decode."
SCORING_INPUTS = {
    "reward_model": ("REWARD_MODEL", {"tooltip": "From Reward Model Loader: the preference model that scores."}),
    "text": ("STRING", {"multiline": True, "tooltip": "The prompt the images were made from (any length: "
                                                       "split into sentences, their features averaged)."}),
    "w": ("FLOAT", {"default": REFERENCE_W, "min": W_RANGE[0], "max": W_RANGE[1], "step": 0.01,
                    "tooltip": "Weight of the text-irrelevant part: s_w = text_relevant + w * text_irrelevant "
                               "(paper: 0.3; 1 = the plain score; 0 = alignment only)."}),
    "direction": (list(reversed(DIRECTION_SOURCES)), {
        "default": "builtin",
        "tooltip": "Where the common text direction v comes from: builtin prompt set, a reference prompt "
                   "file, or the batch (needs two different prompts; one prompt falls back to the "
                   "reference/builtin set and says so in the summary)."}),
}
REFERENCE_INPUT = {"reference_file": ("STRING", {
    "default": "", "tooltip": "Text file, one prompt per line, relative to ComfyUI's input folder (an absolute path "
                              "must lie inside the input folder or a models folder)."})}


class RewardModelLoader:
    """Loads a CLIP preference model from models/reward_models: Denscore or PickScore (a transformers
    CLIPModel folder) or HPSv2 or plain CLIP (an open_clip checkpoint). Frozen, local files only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (reward_model_entries(), {"tooltip": "A model folder or file in models/reward_models."}),
                "kind": (list(REWARD_KINDS), {
                    "default": "denscore",
                    "tooltip": "What the model is: denscore or pickscore (a transformers CLIPModel folder), "
                               "hpsv2 or clip (an open_clip checkpoint)."}),
                "device": (device_choices(), {
                    "default": "auto", "tooltip": "Where the model runs; auto: ComfyUI's device."}),
                "dtype": (["auto", "fp32", "fp16", "bf16"], {
                    "default": "auto",
                    "tooltip": "Weights precision; auto: fp32 on the CPU, bf16 (fp16 where bf16 is missing) on a GPU."}),
            },
            "optional": {
                "architecture": ("STRING", {
                    "default": "ViT-H-14",
                    "tooltip": "open_clip architecture for a single-file hpsv2/clip checkpoint (HPSv2: ViT-H-14)."}),
            },
        }

    RETURN_TYPES = ("REWARD_MODEL",)
    OUTPUT_TOOLTIPS = ("The preference model, for Decomposed Reward Score and Rank By Reward.",)
    FUNCTION = "load"
    CATEGORY = "LongAlign/reward"
    DESCRIPTION = (
        "Loads a preference model that scores how well an image fits a prompt: Denscore or PickScore "
        "(a transformers CLIPModel folder) or HPSv2 or CLIP (an open_clip checkpoint), from "
        "models/reward_models. Local files only; nothing is downloaded."
    )

    VALIDATE_INPUTS = staticmethod(validate_model_name)

    def load(self, model_name, kind, device, dtype, architecture="ViT-H-14"):
        dev, dt = resolve_device_dtype(device, dtype)
        return (load_reward_model(resolve_model_path(model_name), kind, dev, dt, architecture or "ViT-H-14"),)


class DecomposedRewardScore:
    """Scores each image against the prompt with a preference model and splits the score along the
    common text direction v (LongAlign): total s = text_relevant + text_irrelevant, and the reweighted
    s_w = text_relevant + w * text_irrelevant. Scores are cosines (x100 for the paper's tables)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": IMAGES_TOOLTIP}), **SCORING_INPUTS},
                "optional": REFERENCE_INPUT}

    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("total", "text_relevant", "text_irrelevant", "reweighted", "summary")
    OUTPUT_TOOLTIPS = (
        "One score per image: the whole preference score s (a cosine).",
        "One per image: the part of s along the prompt's own direction (does the image show the prompt).",
        "One per image: the part of s common to every prompt (style, quality).",
        "One per image: text_relevant + w x text_irrelevant.",
        "Every image's scores and the batch means as JSON, also shown on the node.",
    )
    OUTPUT_NODE = True
    FUNCTION = "score"
    CATEGORY = "LongAlign/reward"
    DESCRIPTION = (
        "Scores each image against its prompt with a preference model and splits the score in two "
        "(LongAlign): text_relevant, the part that depends on the prompt, and text_irrelevant, the part "
        "every prompt shares. reweighted = text_relevant + w x text_irrelevant. The table on the node "
        "shows every image's scores."
    )

    VALIDATE_INPUTS = staticmethod(validate_w)

    def score(self, images, reward_model, text, w, direction, reference_file=""):
        scores = score_batch(images, reward_model, text, w, direction, reference_file)
        summary = json.dumps(scores.summary(), indent=1, allow_nan=False)
        lists = [getattr(scores, name).tolist() for name in ("total", "text_relevant", "text_irrelevant", "reweighted")]
        return {"ui": {"text": [summary]}, "result": (*lists, summary)}


MIN_SCORE_OFF = -10.0
"""``min_score`` at this value (its minimum) sets no threshold."""


def blocked(message: str | None):
    """ComfyUI's ExecutionBlocker: the nodes fed by this output are skipped (``message`` None) or
    fail with ``message``."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(message)


def _pick_images(images: torch.Tensor, index: list[int]):
    """``images[index]``; an empty selection blocks the output (nothing to save or refine)."""
    return images[torch.tensor(index, device=images.device, dtype=torch.long)] if index else blocked(None)


def check_latent_batch(latent, batch: int) -> None:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.shape[0] != batch:
        found = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(latent).__name__
        raise ValueError(f"Rank By Reward: latent must be the LATENT the {batch} images were decoded from "
                         f"(samples with batch {batch}), got {found}")


def pick_latents(latent: dict, index: list[int]) -> dict:
    """The LATENT of images ``index``: ``samples`` (and a per-image ``noise_mask``, ``batch_index``) in that order."""
    picked = dict(latent)
    rows = torch.tensor(index, dtype=torch.long)
    picked["samples"] = latent["samples"][rows.to(latent["samples"].device)]
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] == latent["samples"].shape[0]:
        picked["noise_mask"] = mask[rows.to(mask.device)]
    if "batch_index" in latent:
        picked["batch_index"] = [latent["batch_index"][i] for i in index]
    return picked


class RankByReward:
    """Sorts an image batch by a decomposed reward score (best first) and returns the top k: best-of-N
    selection for long prompts inside a graph."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": IMAGES_TOOLTIP}), **SCORING_INPUTS,
                "score": (list(SCORE_FIELDS[:4]), {"default": "reweighted", "tooltip": "The score to sort by."}),
                "top_k": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "Images in the top_k output."}),
            },
            "optional": {
                **REFERENCE_INPUT,
                "latent": ("LATENT", {"tooltip": "The latents the images were decoded from (same batch): the chosen "
                                                 "ones come out of top_k_latent, to upscale or refine the best image."}),
                "min_score": ("FLOAT", {
                    "default": MIN_SCORE_OFF, "min": MIN_SCORE_OFF, "max": 10.0, "step": 0.001,
                    "tooltip": f"Keep only images whose score is at least this (scores are cosines, about -1 to 1; "
                               f"{MIN_SCORE_OFF} = no threshold). When none reaches it, top_k and top_k_latent "
                               "produce nothing and the nodes after them are skipped."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "IMAGE", "LATENT")
    RETURN_NAMES = ("sorted", "top_k", "ranking", "rejected", "top_k_latent")
    OUTPUT_TOOLTIPS = (
        "The whole batch, best first.",
        "The top_k best images (those reaching min_score).",
        "The order, the chosen and rejected images, every image's scores and the batch means as JSON, "
        "also shown on the node.",
        "Every image not in top_k, best first.",
        "The latents of the top_k images, in the same order (needs the latent input).",
    )
    OUTPUT_NODE = True
    FUNCTION = "rank"
    CATEGORY = "LongAlign/reward"
    DESCRIPTION = (
        "Best of N for long prompts: scores a batch of images against the prompt with a preference model "
        "(the decomposed reward of Decomposed Reward Score), sorts it best first and returns the top_k "
        "best, optionally only those reaching min_score, and the rejected ones. Connect the latent to get "
        "the chosen latents too, to upscale or refine the best image. The table on the node shows every "
        "image's rank and scores."
    )

    VALIDATE_INPUTS = staticmethod(validate_w)

    def rank(self, images, reward_model, text, w, direction, score, top_k, reference_file="", latent=None,
             min_score=MIN_SCORE_OFF):
        if latent is not None:
            check_latent_batch(latent, images.shape[0])
        scores = score_batch(images, reward_model, text, w, direction, reference_file)
        threshold = None if min_score <= MIN_SCORE_OFF else float(min_score)
        data = scores.ranking(score, top_k, threshold)  # non-finite scores last, flagged in "nonfinite"
        ranking = json.dumps(data, allow_nan=False)
        ranked = images[torch.tensor(data["order"], device=images.device)]
        chosen = _pick_images(images, data["chosen"])
        rejected = _pick_images(images, data["rejected"])
        if latent is None:
            chosen_latent = blocked("Rank By Reward: top_k_latent needs the latent input (the latents the images were decoded from)")
        else:
            chosen_latent = pick_latents(latent, data["chosen"]) if data["chosen"] else blocked(None)
        return {"ui": {"text": [ranking]}, "result": (ranked, chosen, ranking, rejected, chosen_latent)}
