"""The pack's ComfyUI nodes: thin glue over ``training``.

Every node id starts with ``LongAlign`` and every category with ``LongAlign/``. The two ids the
pack shipped first (``LongSDLoader``, ``T5AdapterLoader``) stay registered as deprecated aliases,
so workflows saved with them still load; the front end hides deprecated nodes from its search.
"""
from .encode import LongAlignTextEncode
from .reward import DecomposedRewardScore, RankByReward, RewardModelLoader
from .interpolate import TextEmbeddingInterpolate
from .longsd import LongSDLoader, T5AdapterLoader
from .train import TrainLoRA


def _deprecated_alias(cls: type, new_id: str) -> type:
    """``cls`` under an old node id: same inputs and behaviour, marked ``DEPRECATED``."""
    return type(f"{cls.__name__}OldId", (cls,), {
        "DEPRECATED": True,
        "DESCRIPTION": f"{cls.DESCRIPTION}\n\nThis is the node's old id; new workflows use {new_id}.",
    })


NODE_CLASS_MAPPINGS = {
    "LongAlignTextEncode": LongAlignTextEncode,
    "LongAlignRewardModelLoader": RewardModelLoader,
    "LongAlignDecomposedRewardScore": DecomposedRewardScore,
    "LongAlignRankByReward": RankByReward,
    "LongAlignLongSDLoader": LongSDLoader,
    "LongAlignT5AdapterLoader": T5AdapterLoader,
    "LongAlignTextEmbeddingInterpolate": TextEmbeddingInterpolate,
    "LongAlignTrainLoRA": TrainLoRA,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LongAlignTextEncode": "LongAlign Text Encode (long prompt)",
    "LongAlignRewardModelLoader": "Reward Model Loader (LongAlign)",
    "LongAlignDecomposedRewardScore": "Decomposed Reward Score (LongAlign)",
    "LongAlignRankByReward": "Rank By Reward (best of N)",
    "LongAlignLongSDLoader": "LongSD Loader (long prompt LoRAs)",
    "LongAlignT5AdapterLoader": "T5 Adapter Loader (LongSD)",
    "LongAlignTextEmbeddingInterpolate": "Text Embedding Interpolate (LongAlign)",
    "LongAlignTrainLoRA": "LongAlign Train LoRA",
}

SEARCH_ALIASES = {
    "LongAlignTextEncode": ["long prompt", "long clip", "longclip", "clip text encode long", "sentences"],
    "LongAlignRewardModelLoader": ["reward model", "preference model", "denscore", "pickscore", "hpsv2"],
    "LongAlignDecomposedRewardScore": ["reward score", "text relevant", "image score"],
    "LongAlignRankByReward": ["best of n", "best of", "best-of-n", "rank images", "pick best image"],
    "LongAlignLongSDLoader": ["long prompt lora", "longsd lora"],
    "LongAlignT5AdapterLoader": ["t5 encoder", "text adapter", "long prompt t5"],
    "LongAlignTextEmbeddingInterpolate": ["interpolate prompts", "blend conditioning", "mix prompts"],
    "LongAlignTrainLoRA": ["train lora", "lora training", "fine-tune", "reward training", "finetune"],
}
"""More words the canvas search finds each node by: ComfyUI serves a node's ``SEARCH_ALIASES`` in
``/object_info`` (``search_aliases``; from 0.30) and the front end (1.58) searches them beside the id
and the display name. Older versions ignore them; the display names alone hold the main words."""
for _id, _words in SEARCH_ALIASES.items():
    NODE_CLASS_MAPPINGS[_id].SEARCH_ALIASES = _words

OLD_IDS = {"LongSDLoader": "LongAlignLongSDLoader", "T5AdapterLoader": "LongAlignT5AdapterLoader"}
"""Node ids of earlier releases -> their current id."""

for _old, _new in OLD_IDS.items():
    NODE_CLASS_MAPPINGS[_old] = _deprecated_alias(NODE_CLASS_MAPPINGS[_new], _new)
    NODE_DISPLAY_NAME_MAPPINGS[_old] = NODE_DISPLAY_NAME_MAPPINGS[_new] + " [old id]"
