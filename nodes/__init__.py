"""The pack's ComfyUI nodes: thin glue over ``training``."""
from .encode import LongAlignTextEncode
from .reward import DecomposedRewardScore, RankByReward, RewardModelLoader
from .interpolate import TextEmbeddingInterpolate
from .longsd import LongSDLoader, T5AdapterLoader

NODE_CLASS_MAPPINGS = {
    "LongAlignTextEncode": LongAlignTextEncode,
    "LongAlignRewardModelLoader": RewardModelLoader,
    "LongAlignDecomposedRewardScore": DecomposedRewardScore,
    "LongAlignRankByReward": RankByReward,
    "LongSDLoader": LongSDLoader,
    "T5AdapterLoader": T5AdapterLoader,
    "LongAlignTextEmbeddingInterpolate": TextEmbeddingInterpolate,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LongAlignTextEncode": "LongAlign Text Encode",
    "LongAlignRewardModelLoader": "Reward Model Loader",
    "LongAlignDecomposedRewardScore": "Decomposed Reward Score",
    "LongAlignRankByReward": "Rank By Reward",
    "LongSDLoader": "LongSD Loader",
    "T5AdapterLoader": "T5 Adapter Loader",
    "LongAlignTextEmbeddingInterpolate": "Text Embedding Interpolate",
}
