"""The T5 branch of LongSD's text encoding ("ct5f", SPEC §1) and its conditioning.

    t   = T5(tokens(caption, padded to L, truncated at L))   no attention mask (reference)   (B, L, d_t5)
    a   = TextAdapter(t)                                                                        (B, L, 768)
    c   = concat_seq([clip_concat (B, L, 768), a])                                              (B, 2L, 768)

``clip_concat`` is the segment-level CLIP encoding of :func:`.encode.encode_long_prompts`; the empty
prompt (classifier-free guidance) goes through the same path. The ComfyUI node and the trainer both
call :func:`encode_ct5f`.

T5 weights come from a transformers folder (``config.json`` + ``model.safetensors`` /
``pytorch_model.bin``) or a single safetensors file, whose config is read off the tensor shapes;
every weight file is read through :mod:`.safe_io`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from .adapter import TextAdapter
from .encode import LongPromptEncoding, SegmentOptions, TextEncoderBackend, encode_long_prompts
from .safe_io import (ModelFileError, check_config_sizes, load_tensors, materialize, meta_model, shape_problems,
                      weight_shapes)

T5_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def is_t5_folder(folder: str) -> bool:
    """True if ``folder`` holds a transformers T5 ``config.json`` (``model_type`` t5)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "t5"
    except (OSError, ValueError, AttributeError):
        return False


def has_t5_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in T5_TOKENIZER_FILES)


def t5_tokenizer(folder: str) -> PreTrainedTokenizerBase:
    """The T5 sentencepiece tokenizer from the local ``folder`` (``tokenizer.json`` or ``spiece.model``);
    never a hub name, never a download."""
    if not os.path.isdir(folder) or not has_t5_tokenizer(folder):
        raise ModelFileError(f"T5 tokenizer: {folder!r} is not a local folder holding one of "
                             f"{', '.join(T5_TOKENIZER_FILES)}")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... by case
        raise ModelFileError(f"T5 tokenizer: {folder!r} could not be read (tokenizer files missing or damaged): {e}") from e


def _encoder_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder's tensors (or their shapes) under ``T5EncoderModel`` names (decoder and LM head dropped)."""
    out = {k: v for k, v in state.items() if k.startswith(("encoder.", "shared."))}
    shared = out.get("shared.weight", out.get("encoder.embed_tokens.weight"))
    if shared is not None:  # T5EncoderModel ties the two; files may hold either
        out["shared.weight"] = out["encoder.embed_tokens.weight"] = shared
    return out


def t5_config_from_state_dict(state: Mapping[str, torch.Tensor | Sequence[int]], what: str = "T5 weights") -> T5Config:
    """A ``T5Config`` read off the tensor shapes of a T5 encoder state dict (tensors or their shapes).

    d_model and vocab from ``shared.weight (vocab, d_model)``; layers from ``encoder.block.<i>``;
    heads and buckets from ``relative_attention_bias (buckets, heads)``; d_kv = q rows / heads;
    ``wi`` means ReLU feed-forward (T5 1.0, T5-large), ``wi_0``/``wi_1`` gated GELU (T5 1.1).
    """
    def shape(key: str) -> tuple[int, ...]:
        value = state[key]
        return tuple(value.shape if isinstance(value, torch.Tensor) else value)

    try:
        vocab, d_model = shape("shared.weight")
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
        buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
        d_ff = shape("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    except KeyError as e:
        raise ModelFileError(f"{what}: not a T5 encoder state dict (missing {e})") from e
    except ValueError as e:  # a tensor of another rank than T5's
        raise ModelFileError(f"{what}: not a T5 encoder state dict ({e})") from e
    if heads < 1:
        raise ModelFileError(f"{what}: not a T5 encoder state dict (relative_attention_bias has no heads)")
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=len(blocks),
        num_heads=heads, relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False,
    )


def load_t5_encoder(path: str, dtype: torch.dtype = torch.float32) -> T5EncoderModel:
    """A ``T5EncoderModel`` in eval mode from a transformers folder or a single safetensors file.

    The config (the folder's config.json, or the one read off the tensor shapes) is bounded and the
    model built on the meta device and checked against the weight file's header before anything is
    allocated; then the weights are put in place."""
    what = f"T5 encoder {path!r}"
    if os.path.isdir(path):
        if not is_t5_folder(path):
            raise ModelFileError(f"T5 encoder: {path!r} has no T5 config.json (model_type 't5')")
        weights = next((os.path.join(path, w) for w in T5_WEIGHT_FILES if os.path.isfile(os.path.join(path, w))), None)
        if weights is None:
            raise ModelFileError(f"T5 encoder: no weights in {path!r}; expected one of {', '.join(T5_WEIGHT_FILES)}")
        shapes = _encoder_state_dict(weight_shapes(weights, "T5 encoder weights"))
        try:
            config = T5Config.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... by case
            raise ModelFileError(f"{what}: config.json is not a readable T5 config ({e})") from e
    else:
        weights = path
        shapes = _encoder_state_dict(weight_shapes(path, "T5 encoder weights"))
        config = t5_config_from_state_dict(shapes, what)
    check_config_sizes(config.to_dict(), what, len(shapes))
    expected = {k: v.shape for k, v in meta_model(lambda: T5EncoderModel(config), what).state_dict().items()}
    problems = shape_problems(expected, shapes)
    if problems:
        raise ModelFileError(f"{what}: weights do not match the config: {len(problems)} problems, e.g. {problems[:4]}")
    state = _encoder_state_dict(load_tensors(weights, "T5 encoder weights"))
    return materialize(lambda: T5EncoderModel(config), state, dtype, what).eval()


@dataclass
class T5Branch:
    """T5 tokenizer + encoder + TextAdapter: the second half of the ct5f conditioning."""

    tokenizer: PreTrainedTokenizerBase
    encoder: T5EncoderModel
    adapter: TextAdapter

    def __post_init__(self) -> None:
        d_t5, in_dim = self.encoder.config.d_model, self.adapter.config.in_dim
        if d_t5 != in_dim:
            raise ValueError(f"T5 d_model {d_t5} does not match the TextAdapter's in_dim {in_dim}")

    def encode(self, texts: Sequence[str], token_length: int) -> torch.Tensor:
        """``TextAdapter(T5(ids))``, ids padded/truncated to ``token_length``, no mask: (B, L, out_dim)."""
        return self.adapt(self.hidden(texts, token_length))

    def hidden(self, texts: Sequence[str], token_length: int) -> torch.Tensor:
        """``T5(ids)``: the frozen encoder's last hidden state, (B, L, d_model)."""
        if token_length < 1:
            raise ValueError(f"the T5 branch needs token_length >= 1 (reference: 240), got {token_length}")
        ids = self.tokenizer(list(texts), max_length=token_length, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids.to(self.encoder.device)
        return self.encoder(input_ids=ids).last_hidden_state

    def adapt(self, hidden: torch.Tensor) -> torch.Tensor:
        """``TextAdapter(hidden)``: (B, L, out_dim), in the adapter's dtype (it may be training)."""
        adapter_param = next(self.adapter.parameters())
        return self.adapter(hidden.to(adapter_param.device, adapter_param.dtype)).sample


def encode_ct5f(
    texts: Sequence[str],
    backend: TextEncoderBackend,
    branch: T5Branch,
    options: SegmentOptions = SegmentOptions(),
    pad: torch.Tensor | None = None,
) -> LongPromptEncoding:
    """``cat([clip_concat (B, L, D), adapter(T5) (B, L, D)], dim=1)``: LongSD's (B, 2L, D) conditioning.

    The CLIP half needs a fixed length (``token_length > 0`` with pad ``mean``) so both halves have L rows.
    """
    if options.token_length < 1 or options.pad != "mean":
        raise ValueError(
            "the ct5f (CLIP + T5) conditioning needs token_length >= 1 and pad 'mean' (reference: 240, mean), "
            f"got token_length {options.token_length} and pad {options.pad!r}"
        )
    clip = encode_long_prompts(texts, backend, options, pad)
    return replace(clip, cond=join_ct5f(clip.cond, branch.encode(texts, options.token_length)))


def join_ct5f(clip: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
    """``cat([clip, t5], dim=1)`` in the CLIP half's dtype and device, widths checked."""
    if t5.shape[-1] != clip.shape[-1]:
        raise ValueError(f"the TextAdapter's out_dim {t5.shape[-1]} does not match the CLIP width {clip.shape[-1]}")
    return torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=1)


LAVI_BRIDGE_INT_DIM = 896
"""``int_dim`` of the T5-large -> SD1.5 TextAdapter that LaVi-Bridge trained and LongSD starts from."""


def load_t5_branch(t5_path: str, adapter_path: str | None, tokenizer_path: str | None = None,
                   out_dim: int = 768) -> T5Branch:
    """The trainer's T5 branch: T5 from ``t5_path`` (folder or file), its tokenizer from
    ``tokenizer_path`` (default: the T5 folder), and the TextAdapter from ``adapter_path`` or, without
    one, a new adapter ``(d_t5 -> 896 -> out_dim)`` to train from scratch."""
    tokenizer_folder = tokenizer_path or (t5_path if os.path.isdir(t5_path) else None)
    if tokenizer_folder is None or not has_t5_tokenizer(tokenizer_folder):
        raise ModelFileError(
            f"model.t5: no T5 tokenizer ({', '.join(T5_TOKENIZER_FILES)}) in {tokenizer_folder or t5_path!r}; "
            "put it in the T5 folder or set model.t5_tokenizer"
        )
    from .adapter import load_text_adapter

    encoder = load_t5_encoder(t5_path)
    adapter = (load_text_adapter(adapter_path) if adapter_path
               else TextAdapter(encoder.config.d_model, LAVI_BRIDGE_INT_DIM, out_dim))
    return T5Branch(t5_tokenizer(tokenizer_folder), encoder.requires_grad_(False), adapter)
