"""ComfyUI imported in-process (CPU), the pack loaded as ComfyUI loads it, and ComfyUI CLIP objects
built from transformers weights. Used by the tests' fixtures and by ``bench/``."""
from __future__ import annotations

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_comfy(root: str, cpu: bool = True) -> None:
    """Put ComfyUI's folder first on ``sys.path`` and import it (``cpu``: as ``--cpu``; the tests'
    way; the GPU benchmarks pass False)."""
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import utils.extra_config  # noqa: F401  (before `nodes`: see COMFYUI-NOTES)


def load_pack(name: str = "comfyui_longalign"):
    """The pack imported as a package from its folder, as ComfyUI's custom-node loader does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def comfy_clip_from_transformers(model, dtype=None):
    """ComfyUI's SD1.x CLIP object holding exactly ``model``'s weights (``dtype``: float32 unless given)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import torch

    from tiny_models import clip_ldm_state_dict

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {"clip_l_model_config": {"num_hidden_layers": model.config.num_hidden_layers}, "dtype": dtype or torch.float32}
    clip = comfy.sd.CLIP(target, model_options=options)
    missing, _ = clip.load_sd(clip_ldm_state_dict(model))
    missing = [k for k in missing if "text_projection" not in k and "logit_scale" not in k]
    if missing:
        raise RuntimeError(f"CLIP weights not loaded into ComfyUI: {missing[:5]}")
    return clip
