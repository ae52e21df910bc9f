"""The pack's ComfyUI nodes: thin glue over ``training``."""
from .encode import LongAlignTextEncode

NODE_CLASS_MAPPINGS = {
    "LongAlignTextEncode": LongAlignTextEncode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LongAlignTextEncode": "LongAlign Text Encode",
}
