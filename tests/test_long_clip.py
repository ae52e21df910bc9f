"""Long-CLIP-L (248 positions) as ComfyUI core loads it from a text encoder file: LongAlign Text Encode
keeps sentences of up to 246 tokens as one segment and equals the library on the same weights, native
split equals the stock CLIP Text Encode, and the counter route, told the file, counts the rows the
encoder keeps (in-process: ComfyUI's real loader and tokenizer, aiohttp's test server)."""
from __future__ import annotations

import asyncio
import importlib
import json
import os

import aiohttp
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestServer
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from tiny_models import clip_ldm_state_dict
from training.encode import SegmentOptions, encode_long_prompts

pytestmark = pytest.mark.comfyui  # ComfyUI's Long-CLIP loading, rerun on every ComfyUI version
POSITIONS = 248
WIDTHS = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2, projection_dim=64)
FILE = "tiny_long_clip_l.safetensors"
LONG_SENTENCE = "A lighthouse keeper walks " + ", ".join(f"past stone number {i}" for i in range(30)) + "."
TEXT = f"A red boat on a calm sea. {LONG_SENTENCE} Gulls circle the lamp."


def write_long_clip(path: str) -> CLIPTextModel:
    """A narrow Long-CLIP-L (transformers, 248 positions) written at ``path`` as a text encoder file
    (the ``text_model.`` keys ComfyUI's CLIP Loader reads)."""
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=POSITIONS, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **WIDTHS)
    model = CLIPTextModel(config).eval()
    save_file(clip_ldm_state_dict(model), path)
    return model


@pytest.fixture(scope="module")
def long_clip(comfy, tmp_path_factory):
    """:func:`write_long_clip` in a registered ``text_encoders`` folder, loaded by ``comfy.sd.load_clip``
    (CLIP Loader's loader), which sizes the model and tokenizer from the file's position table.
    Returns (library backend, ComfyUI CLIP)."""
    import comfy.sd
    import folder_paths

    from training.clip_text import TransformersClipBackend, clip_tokenizer

    folder = tmp_path_factory.mktemp("text_encoders")
    path = os.path.join(folder, FILE)
    model = write_long_clip(path)
    folder_paths.add_model_folder_path("text_encoders", str(folder))
    # layer count and widths: the tiny model's (a real Long-CLIP-L has CLIP-L's, which ComfyUI assumes)
    clip = comfy.sd.load_clip([path], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                              model_options={"model_config": {k: v for k, v in WIDTHS.items()}, "dtype": torch.float32})
    backend = TransformersClipBackend(clip_tokenizer(), model)
    backend.window = POSITIONS
    yield backend, clip
    folder_paths.folder_names_and_paths["text_encoders"][0].remove(str(folder))


@pytest.fixture(scope="module")
def node(pack):
    return pack.NODE_CLASS_MAPPINGS["LongAlignTextEncode"]()


def test_comfyui_loads_the_file_as_long_clip(long_clip):
    _, clip = long_clip
    assert len(clip.tokenize("")["l"][0]) == POSITIONS
    tables = [m.position_embedding.weight.shape[0] for m in clip.cond_stage_model.modules()
              if type(m).__name__ == "CLIPEmbeddings"]
    assert tables == [POSITIONS]


@pytest.mark.parametrize("options", [
    SegmentOptions(token_length=0, pad="none"), SegmentOptions(), SegmentOptions(token_length=60, keep_bos=False),
], ids=["natural", "L240", "L60-no-bos"])
def test_a_sentence_over_75_tokens_is_one_segment_and_the_node_equals_the_library(node, long_clip, options):
    library_backend, clip = long_clip
    (ours,) = node.encode(clip, TEXT, options.split, options.token_length, options.pad, options.keep_bos)
    with torch.no_grad():
        library = encode_long_prompts([TEXT], library_backend, options)
    assert ours[0][0].shape == library.cond.shape
    torch.testing.assert_close(ours[0][0], library.cond, atol=1e-4, rtol=1e-4)
    if options.token_length == 0:
        assert library.segments[0] == ["A red boat on a calm sea.", LONG_SENTENCE, "Gulls circle the lamp."]
        long_tokens = library.kept_tokens[0] - 7 - 6  # the two short sentences: BOS + 6 and BOS + 5 rows
        assert long_tokens > 100 and ours[0][0].shape[1] == library.kept_tokens[0]


def test_native_split_equals_the_stock_clip_text_encode(node, long_clip):
    import nodes as comfy_nodes

    _, clip = long_clip
    (ours,) = node.encode(clip, TEXT, "native", 0, "none", True)
    (stock,) = comfy_nodes.CLIPTextEncode().encode(clip, TEXT)
    assert ours[0][0].shape == stock[0][0].shape == (1, POSITIONS, WIDTHS["hidden_size"])
    torch.testing.assert_close(ours[0][0], stock[0][0])


def test_text_encoders_of_different_lengths_are_a_clear_error(comfy, pack):
    import comfy.sdxl_clip

    class TokenizerOnly:  # what the backend reads of a CLIP: an SDXL tokenizer with a Long-CLIP-L beside CLIP-G
        cond_stage_model = torch.nn.Module()
        tokenizer = comfy.sdxl_clip.SDXLTokenizer(tokenizer_data={"clip_l_max_length": POSITIONS})

        def tokenize(self, text):
            return self.tokenizer.tokenize_with_weights(text)

    with pytest.raises(ValueError, match=r"different lengths \(clip_l 248, clip_g 77 positions\)"):
        pack.nodes.comfy_clip.ComfyClipBackend(TokenizerOnly())


def _count(pack, bodies: list[dict]) -> list[tuple[int, dict]]:
    routes = importlib.import_module(f"{pack.__name__}.nodes.routes")
    table = web.RouteTableDef()
    routes.register(table)
    app = web.Application()
    app.add_routes(table)

    async def main():
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            out = []
            for body in bodies:
                async with session.post(server.make_url(routes.ROUTE), data=json.dumps(body)) as r:
                    out.append((r.status, await r.json()))
            return out

    return asyncio.run(main())


def test_the_counter_told_the_clip_file_counts_the_rows_the_encoder_keeps(pack, long_clip):
    _, clip = long_clip
    encode = pack.nodes.encode.encode_prompt
    (status, long), (_, plain), (bad, error) = _count(pack, [
        {"text": TEXT, "token_length": 0, "clip_name": FILE}, {"text": TEXT, "token_length": 0},
        {"text": TEXT, "clip_name": "../" + FILE}])
    assert status == 200 and long["window"] == POSITIONS and plain["window"] == 77
    _, natural = encode(clip, TEXT, SegmentOptions(token_length=0, pad="none"))
    assert [s["text"] for s in long["segments"]] == natural.segments[0]
    assert long["kept_tokens"] == natural.kept_tokens[0] == sum(s["tokens"] for s in long["segments"])
    assert len(plain["segments"]) > len(long["segments"])  # a 77-token CLIP splits the long sentence
    assert bad == 400 and "'clip_name'" in error["error"] and "text_encoders" in error["error"]
