"""The codec registry: codec name (as written in device maps) -> implementation.

Each built-in codec module defines one `CODEC`; this module imports them by name. There is no
folder scanning and no loading by string: adding a codec means adding it to `_BUILT_INS`.
"""

from __future__ import annotations

from gateway.codecs import osm_v2
from gateway.codecs.base import Codec, CodecOptions, DecodeContext, DecodeError

__all__ = ["CODECS", "Codec", "CodecOptions", "DecodeContext", "DecodeError"]

_BUILT_INS = (osm_v2,)

CODECS: dict[str, Codec] = {module.CODEC.name: module.CODEC for module in _BUILT_INS}
