"""The pack's ComfyUI nodes: thin glue over ``training``.

Every node id starts with ``LongAlign`` and every category with ``LongAlign/``. The two ids the
pack shipped first (``LongSDLoader``, ``T5AdapterLoader``) stay registered as deprecated aliases,
so workflows saved with them still load; the front end hides deprecated nodes from its search.
"""
from .encode import LongAlignTextEncode
from .reward import DecomposedRewardScore, RankByReward, RewardModelLoader
from .interpolate import TextEmbeddingInterpolate
from .longsd import LongSDLoader, T5AdapterLoader


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
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LongAlignTextEncode": "LongAlign Text Encode (long prompt)",
    "LongAlignRewardModelLoader": "Reward Model Loader (LongAlign)",
    "LongAlignDecomposedRewardScore": "Decomposed Reward Score (LongAlign)",
    "LongAlignRankByReward": "Rank By Reward (best of N)",
    "LongAlignLongSDLoader": "LongSD Loader (long prompt LoRAs)",
    "LongAlignT5AdapterLoader": "T5 Adapter Loader (LongSD)",
    "LongAlignTextEmbeddingInterpolate": "Text Embedding Interpolate (LongAlign)",
}

OLD_IDS = {"LongSDLoader": "LongAlignLongSDLoader", "T5AdapterLoader": "LongAlignT5AdapterLoader"}
"""Node ids of earlier releases -> their current id."""

for _old, _new in OLD_IDS.items():
    NODE_CLASS_MAPPINGS[_old] = _deprecated_alias(NODE_CLASS_MAPPINGS[_new], _new)
    NODE_DISPLAY_NAME_MAPPINGS[_old] = NODE_DISPLAY_NAME_MAPPINGS[_new] + " [old id]"
