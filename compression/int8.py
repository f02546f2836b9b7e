"""int8 KV (MaxText's `quantize_kvcache=int8`): every token's key and value of
each kv-head get one absmax scale, scale = max|x| / 127, code = round(x / scale) (half to even) in
[-127, 127]; dequantized as code * scale. No full-precision residual: a token is quantized once
the attention of the step that appended it has read it exactly.

Deviation: MaxText stores the absmax and codes round(x * 127.5 / absmax), which XLA's conversion
saturates to 127 at the absmax itself; here the scale is absmax / 127 and x is divided by it.
"""

import dataclasses

from compression.quantized_cache import QuantizedStore
from pallas_kernels.kv_packing import quantize_int8_symmetric


@dataclasses.dataclass(frozen=True)
class Int8(QuantizedStore):
    def quantize_keys(self, x):
        return quantize_int8_symmetric(x, x.dtype)

    def quantize_values(self, x):
        return quantize_int8_symmetric(x, x.dtype)
