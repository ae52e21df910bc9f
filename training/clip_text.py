"""The trainer's CLIP text side: the CLIP BPE tokenizer and a transformers ``CLIPTextModel`` as a
:class:`.encode.TextEncoderBackend`.

The tokenizer comes from the user's model folder (``tokenizer/`` of a diffusers SD folder, or any
folder with ``vocab.json`` + ``merges.txt``) or, with no folder, from the CLIP BPE that ships inside
``open_clip_torch`` (the same vocabulary SD1.x and ComfyUI use): nothing is downloaded.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from typing import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .encode import SegmentRow
from .safe_io import ModelFileError
from .transfer import to_device

CLIP_WINDOW = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-character table, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@lru_cache(maxsize=1)
def _open_clip_bpe() -> tuple[dict[str, int], list[str]]:
    """vocab and merges rebuilt from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (49408 tokens)."""
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1: 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(folder: str | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer from ``folder`` (vocab.json + merges.txt, or tokenizer.json; in the folder or
    its ``tokenizer/``), or from open_clip's BPE."""
    if folder is not None:
        for sub in ("", "tokenizer"):
            path = os.path.join(folder, sub)
            has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
            if (has("vocab.json") and has("merges.txt")) or has("tokenizer.json"):
                return CLIPTokenizer.from_pretrained(path, local_files_only=True)
        raise ModelFileError(
            f"no CLIP tokenizer in {folder!r}: expected vocab.json and merges.txt (or tokenizer.json) there or in "
            "its tokenizer/ folder"
        )
    vocab, merges = _open_clip_bpe()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(
            tmp, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=CLIP_WINDOW,
            local_files_only=True,
        )


class TransformersClipBackend:
    """A transformers ``CLIPTextModel`` driven as a segment encoder.

    ``hidden_layer``: None = last hidden state with the final layer norm (SD1.x); a negative index
    (-2 for SD2.x's penultimate layer) takes that layer and applies the final layer norm, as
    ComfyUI does.
    """

    window = CLIP_WINDOW

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, hidden_layer: int | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.hidden_layer = hidden_layer
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def tokenize(self, text: str) -> list[SegmentRow]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[SegmentRow]]:
        content = self.window - 2
        out = []
        for ids in self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]:
            chunks = [ids[i: i + content] for i in range(0, len(ids), content)] or [[]]
            out.append([SegmentRow(len(c) + 1, [self.bos, *c, self.eos] + [self.pad] * (content - len(c)))
                        for c in chunks])
        return out

    def encode(self, rows: Sequence[SegmentRow], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.text_encoder.device
        ids = to_device([row.payload[:length] for row in rows], device, torch.long)
        out = self.text_encoder(input_ids=ids, output_hidden_states=self.hidden_layer is not None)
        if self.hidden_layer is None:
            hidden = out.last_hidden_state
        else:
            text_model = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4 / 5
            hidden = text_model.final_layer_norm(out.hidden_states[self.hidden_layer])
        return hidden, out.pooler_output[:1]
