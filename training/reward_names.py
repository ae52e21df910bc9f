"""The reward side's names that command lines offer, importable without torch (so ``--help`` answers
at once): the preference-model kinds, where the common direction ``v`` comes from, and the paper's
reweighting ``w`` of the text-irrelevant part (``s_w = s_rel + w s_irr``, SPEC §3)."""

TRANSFORMERS_KINDS = ("denscore", "pickscore")
OPEN_CLIP_KINDS = ("hpsv2", "clip")
REWARD_KINDS = TRANSFORMERS_KINDS + OPEN_CLIP_KINDS
DIRECTION_SOURCES = ("batch", "reference", "builtin")
REFERENCE_W = 0.3
