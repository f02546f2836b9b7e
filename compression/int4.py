"""int4 KV, per token: keys and values alike get KIVI's value quantizer (Liu et al., "KIVI: A
Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024), asymmetric min-max per token
over groups of 32 channels: scale = (max - min) / 15, zero = min, two codes per byte. This is the
per-token scheme KIVI argues against for keys, kept as a baseline. No full-precision residual: a
token is quantized once the attention of the step that appended it has read it exactly. A
head_dim below 32 makes the group the whole head.
"""

import dataclasses

from compression.quantized_cache import QuantizedStore
from pallas_kernels.kv_packing import quantize_per_token

GROUP = 32


@dataclasses.dataclass(frozen=True)
class Int4(QuantizedStore):
    def quantize_keys(self, x):
        return quantize_per_token(x, 4, min(GROUP, x.shape[-1]), x.dtype)

    def quantize_values(self, x):
        return quantize_per_token(x, 4, min(GROUP, x.shape[-1]), x.dtype)
