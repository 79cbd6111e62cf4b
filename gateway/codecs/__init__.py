"""The codec registry: codec name (as written in device maps) -> implementation.

Each built-in codec module defines one `CODEC`; this module imports them by name. There is no
folder scanning and no loading by string: adding a codec means adding it to `_BUILT_INS`.
"""

from __future__ import annotations

from gateway.codecs import cayenne_lpp, chirpstack_object, osm_json, osm_v2, packed_samples
from gateway.codecs.base import Codec, CodecOptions, DecodeContext, DecodeError

__all__ = ["CODECS", "Codec", "CodecOptions", "DecodeContext", "DecodeError"]

_BUILT_INS = (osm_v2, osm_json, cayenne_lpp, chirpstack_object, packed_samples)

CODECS: dict[str, Codec] = {module.CODEC.name: module.CODEC for module in _BUILT_INS}
