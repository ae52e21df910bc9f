"""CLIP-based preference models (Denscore, PickScore, HPSv2, plain CLIP) from local files only.

* ``denscore`` / ``pickscore``: a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors``
  or ``pytorch_model.bin``, sharded or not), read with ``from_pretrained(local_files_only=True)``.
* ``hpsv2`` / ``clip``: an ``open_clip`` model: a checkpoint file (``.safetensors``, or a weights-only
  ``.pt/.pth/.bin`` such as HPSv2's ``{"state_dict": ...}``) with an architecture name (built in to
  open_clip, default ``ViT-H-14``) or a JSON model config; or a hub-layout folder with
  ``open_clip_config.json`` beside the weights. Weights are read through :mod:`.safe_io`.

No processor or tokenizer is fetched from a hub: text goes through the CLIP BPE
(:func:`.clip_text.clip_tokenizer`; 77 tokens, truncation, padding to 77) and images through
:func:`.scoring.preprocess_images` (CLIP mean/std at the model's own input size, 224 for ViT-H-14).
Every model is frozen: ``eval()`` and ``requires_grad_(False)``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import torch
from transformers import CLIPTokenizer

from .clip_text import CLIP_WINDOW, clip_tokenizer
from .folder_walk import walk_folder
from .reward_names import OPEN_CLIP_KINDS, REWARD_KINDS, TRANSFORMERS_KINDS
from .safe_io import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, ModelFileError, check_config_sizes, load_json_object,
                      load_pretrained_folder, load_tensors, materialize, meta_model, shape_problems, weight_shapes)
from .transfer import to_device

RewardKind = Literal["denscore", "pickscore", "hpsv2", "clip"]
MODEL_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
COMFYUI_FOLDER = "ComfyUI/models/reward_models"
TRANSFORMERS_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin",
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_ID = 0
"""open_clip and the laion ViT-H-14 processor pad with id 0 after EOS; the causal text tower never
lets a position after EOS change the pooled (EOS) feature, so any pad id gives the same features."""


@lru_cache(maxsize=1)
def _builtin_tokenizer() -> CLIPTokenizer:
    return clip_tokenizer()


@dataclass(frozen=True)
class RewardSource:
    """Where a preference model was loaded from: what another process needs to load it again (the
    trainer's ``model.reward_model``, ``model.reward_kind``, ``model.reward_arch``)."""

    path: str
    kind: RewardKind
    architecture: str | None
    """open_clip architecture name or JSON config (hpsv2/clip single files); None for the other kinds."""


class PreferenceModel:
    """A frozen CLIP preference model: tokenizer, image/text towers and CLIP preprocessing constants.

    ``encode_text`` / ``encode_image`` return the projected, **unnormalised** features; the scorer
    (:mod:`.scoring`) normalises them.
    """

    def __init__(self, kind: RewardKind, path: str, model: torch.nn.Module, logit_scale: float,
                 image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 tokenizer: CLIPTokenizer | None = None):
        self.kind, self.path, self.model = kind, path, model.eval().requires_grad_(False)
        self.logit_scale = float(logit_scale)
        """exp(logit_scale) of the checkpoint: PickScore reports ``logit_scale * f_T . f_I``."""
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.tokenizer = tokenizer or _builtin_tokenizer()
        self.text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        """Text features of fixed prompt sets (the reference direction), keyed by the prompts."""
        self.source: RewardSource | None = None
        """Set by :func:`load_reward_model`; None for a model built in memory."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, sentences: Sequence[str]) -> torch.Tensor:
        """``(N, 77)`` ids: ``[BOS, tokens[:75], EOS, 0 ...]`` (truncation and padding to 77)."""
        tok = self.tokenizer
        content = CLIP_WINDOW - 2
        ids = tok(list(sentences), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        rows = [[tok.bos_token_id, *t[:content], tok.eos_token_id] for t in ids]
        rows = [r + [PAD_ID] * (CLIP_WINDOW - len(r)) for r in rows]
        return to_device(rows, self.device, torch.long)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"PreferenceModel({self.kind}, {os.path.basename(self.path)!r}, {self.device}, {self.dtype})"


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object (projected features in ``pooler_output``), 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class TransformersPreferenceModel(PreferenceModel):
    """Denscore / PickScore: a transformers ``CLIPModel``."""

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=ids))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.dtype)))


class OpenClipPreferenceModel(PreferenceModel):
    """HPSv2 / plain CLIP: an ``open_clip`` model."""

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids, normalize=False)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.dtype), normalize=False)


WHERE = f"(ComfyUI looks for reward models in {COMFYUI_FOLDER}; the trainer takes any local path)"


def _wrong_kind(path: str, kind: str, found: str) -> ModelFileError:
    other = "hpsv2 or clip (open_clip checkpoint)" if kind in TRANSFORMERS_KINDS else "denscore or pickscore (transformers CLIPModel folder)"
    expected = ("a transformers CLIPModel folder with config.json and model.safetensors or pytorch_model.bin"
                if kind in TRANSFORMERS_KINDS else
                "an open_clip checkpoint file (.safetensors/.pt/.pth/.bin) or a folder with open_clip_config.json")
    return ModelFileError(f"reward model {path!r}: kind {kind!r} expects {expected}, but {found}; "
                          f"if this is another kind of model, choose kind {other}")


def load_reward_model(path: str, kind: RewardKind, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, architecture: str = "ViT-H-14") -> PreferenceModel:
    """Load a frozen preference model of ``kind`` from the local ``path`` (see the module docstring).

    ``architecture`` (open_clip kinds, single-file checkpoints only): an open_clip model name or a
    JSON file holding an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) or an
    ``open_clip_config.json`` (``model_cfg``).
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward model kind must be one of {', '.join(REWARD_KINDS)}, got {kind!r}")
    if not os.path.exists(path):
        raise ModelFileError(f"reward model {path!r} does not exist {WHERE}")
    if kind in TRANSFORMERS_KINDS:
        model = _load_transformers(path, kind, dtype)
    else:
        model = _load_open_clip(path, kind, dtype, architecture)
    model.model.to(device)
    if kind in OPEN_CLIP_KINDS and not os.path.isdir(path):  # a single file: its architecture is needed again
        arch = os.path.abspath(architecture) if architecture.lower().endswith(".json") else architecture
    else:
        arch = None
    model.source = RewardSource(os.path.abspath(path), kind, arch)
    return model


def _load_transformers(path: str, kind: RewardKind, dtype: torch.dtype) -> PreferenceModel:
    from transformers import CLIPModel

    if not os.path.isdir(path):
        raise _wrong_kind(path, kind, "it is a file")
    names = set(os.listdir(path))
    if "config.json" not in names:
        found = "the folder has open_clip_config.json instead" if "open_clip_config.json" in names else "config.json is missing"
        raise _wrong_kind(path, kind, found)
    if not names & set(TRANSFORMERS_WEIGHTS):
        raise ModelFileError(f"reward model {path!r}: no weights; expected one of {', '.join(TRANSFORMERS_WEIGHTS)} "
                             f"next to config.json {WHERE}")
    model_type = load_json_object(os.path.join(path, "config.json")).get("model_type")
    if model_type != "clip":
        raise _wrong_kind(path, kind, f"its config.json has model_type {model_type!r} (expected 'clip')")
    model = load_pretrained_folder(CLIPModel, path, f"reward model {path!r}", dtype)
    tokenizer = _folder_tokenizer(path)
    return TransformersPreferenceModel(kind, path, model, model.logit_scale.exp().item(),
                                       model.config.vision_config.image_size, tokenizer=tokenizer)


def _folder_tokenizer(path: str) -> CLIPTokenizer | None:
    """The folder's own CLIP BPE when it ships one (same vocabulary as the built-in one)."""
    for sub in ("", "tokenizer"):
        if all(os.path.isfile(os.path.join(path, sub, n)) for n in ("vocab.json", "merges.txt")):
            return clip_tokenizer(path)
    return None


def _open_clip_config(path: str, kind: RewardKind, architecture: str) -> tuple[dict, str, dict]:
    """(model config, checkpoint file, preprocess config) for an open_clip source."""
    import open_clip

    if os.path.isdir(path):
        config_file = os.path.join(path, "open_clip_config.json")
        if not os.path.isfile(config_file):
            found = "it is a transformers folder (config.json)" if os.path.isfile(os.path.join(path, "config.json")) \
                else "the folder has no open_clip_config.json"
            raise _wrong_kind(path, kind, found)
        cfg = load_json_object(config_file)
        if "model_cfg" not in cfg:
            raise ModelFileError(f"{config_file!r} has no 'model_cfg' (expected open_clip's hub config layout)")
        names = [n for n in OPEN_CLIP_WEIGHTS if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise ModelFileError(f"reward model {path!r}: no weights next to open_clip_config.json; expected "
                                 f"one of {', '.join(OPEN_CLIP_WEIGHTS)} {WHERE}")
        return cfg["model_cfg"], os.path.join(path, names[0]), cfg.get("preprocess_cfg", {})
    if architecture.lower().endswith(".json"):
        if not os.path.isfile(architecture):
            raise ModelFileError(f"open_clip model config {architecture!r} does not exist")
        cfg = load_json_object(architecture)
        return cfg.get("model_cfg", cfg), path, cfg.get("preprocess_cfg", {})
    cfg = open_clip.get_model_config(architecture)
    if cfg is None:
        raise ValueError(f"open_clip has no architecture {architecture!r}; give a built-in name "
                         f"(e.g. ViT-H-14, ViT-L-14) or a JSON model config file")
    return cfg, path, {}


HUB_FIELDS = ("hf_model_name", "hf_tokenizer_name")
"""open_clip config fields that name a model or tokenizer on a hub: building from them downloads."""


def _refuse_downloads(cfg: dict, source: str) -> None:
    """Refuse every open_clip config field that would download: a hub text tower or tokenizer
    (:data:`HUB_FIELDS`) and any ``*pretrained*`` flag that is set (timm's ``timm_model_pretrained``,
    ``hf_model_pretrained``, ``pretrained``): this pack reads local files only."""
    stack = [("", cfg)]
    while stack:
        prefix, node = stack.pop()
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                stack.append((name + ".", value))
            elif value and (key in HUB_FIELDS or "pretrained" in str(key).lower()):
                raise ModelFileError(f"{source}: field {name} = {value!r} would download weights or a tokenizer "
                                     "from a model hub; this pack loads local files only (remove the field, and "
                                     "put the weights in the checkpoint)")


def _load_open_clip(path: str, kind: RewardKind, dtype: torch.dtype, architecture: str) -> PreferenceModel:
    """Checked before anything is built or allocated: no field that downloads, sizes within
    :data:`.safe_io.SIZE_BOUNDS`, and the model's shapes (built on the meta device) equal to the
    checkpoint's header; then the model is built around the checkpoint's tensors."""
    import open_clip

    cfg, checkpoint, preprocess = _open_clip_config(path, kind, architecture)
    source = os.path.join(path, "open_clip_config.json") if os.path.isdir(path) else (
        repr(architecture) if architecture.lower().endswith(".json") else f"open_clip architecture {architecture!r}")
    if not (isinstance(cfg, dict) and isinstance(cfg.get("vision_cfg"), dict) and isinstance(cfg.get("text_cfg"), dict)
            and isinstance(preprocess, dict)):
        raise ModelFileError(f"reward model {path!r}: {source} is not an open_clip model config (expected an object "
                             "with embed_dim, vision_cfg and text_cfg)")
    cfg = dict(cfg)
    _refuse_downloads(cfg, source)
    if "multimodal_cfg" in cfg:
        raise ModelFileError(f"reward model {path!r}: open_clip architecture with a captioning head is not a "
                             "supported preference model")
    if not checkpoint.lower().endswith(MODEL_SUFFIXES):
        raise _wrong_kind(checkpoint, kind, "its extension is not a model file's")
    what = f"{kind} checkpoint {checkpoint!r}"
    shapes = {k.removeprefix("module."): v for k, v in weight_shapes(checkpoint, f"{kind} checkpoint").items()}
    shapes.pop("text.transformer.embeddings.position_ids", None)
    check_config_sizes(cfg, f"reward model {path!r} ({source})", len(shapes))
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    build = lambda: model_class(**cfg)  # noqa: E731
    expected = {k: v.shape for k, v in meta_model(build, f"reward model {path!r} ({source})").state_dict().items()}
    if "logit_scale" in shapes and "logit_scale" in expected and math.prod(shapes["logit_scale"]) == 1:
        shapes["logit_scale"] = expected["logit_scale"]  # a scalar saved as () or (1,)
    problems = shape_problems(expected, shapes)
    if problems:
        name = "from open_clip_config.json" if os.path.isdir(path) else repr(architecture)
        raise ModelFileError(f"{what} does not match open_clip architecture {name} "
                             f"(wrong kind or architecture?): {len(problems)} problems, e.g. {problems[:4]}")
    state = {k.removeprefix("module."): v for k, v in load_tensors(checkpoint, f"{kind} checkpoint").items()}
    state.pop("text.transformer.embeddings.position_ids", None)
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"])
    model = materialize(build, state, dtype, what)
    image_size = cfg["vision_cfg"].get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    return OpenClipPreferenceModel(
        kind, path, model, model.logit_scale.exp().item(), image_size,
        preprocess.get("mean", CLIP_MEAN), preprocess.get("std", CLIP_STD),
    )


def list_reward_models(root: str) -> list[str]:
    """Model entries under ``root``, relative paths: model files, and model folders (holding
    ``config.json`` or ``open_clip_config.json``) as one entry each, sorted."""
    entries: list[str] = []
    if not os.path.isdir(root):
        return entries
    for folder, dirs, files in walk_folder(root):  # bounded: link loops and huge trees cannot hang a listing
        rel = os.path.relpath(folder, root)
        if rel != "." and ("config.json" in files or "open_clip_config.json" in files):
            entries.append(rel)
            dirs.clear()
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        entries.extend(os.path.normpath(os.path.join(rel, f)) for f in files
                       if f.lower().endswith(MODEL_SUFFIXES) and not f.startswith("."))
    return sorted(e.replace(os.sep, "/") for e in entries)
