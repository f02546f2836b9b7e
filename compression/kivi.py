"""KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024;
code: jy-yuan/KIVI): keys quantized per channel over groups of G consecutive tokens, values per
token over groups of G channels, asymmetric min-max (scale = (max - min) / (2^b - 1), zero = min,
code = round(clamp((x - min) / scale, 0, 2^b - 1)), half to even), and the R newest tokens in full
precision. `kivi2` and `kivi4` use 2 or 4 bits with the paper's G = 32 and R = 128 (also the
KIVI repository's LongBench setting). When keys and values are quantized is
`compression.quantized_cache`'s rule, KIVI's: keys in whole R-token blocks, values as they leave
a sliding window of the R newest tokens, each after the attention that saw them exact.

Deviations:
- keys are bit-packed along channels (the layout the decode kernel reads); KIVI packs them along
  tokens. Codes, scales and zeros are the same.
- scales and zeros are stored in the cache dtype and codes computed against them in float32;
  KIVI rounds every intermediate to fp16. With a float32 cache the two agree bit for bit.
- a head_dim below G makes the value groups the whole head.
- the question, appended after compression in one chunk, attends to the quantized context and,
  exactly, to the residual and itself; KIVI prefills context and question together, exactly.
"""

import dataclasses

from compression.quantized_cache import QuantizedStore
from pallas_kernels.errors import UserError
from pallas_kernels.kv_packing import quantize_per_channel, quantize_per_token


@dataclasses.dataclass(frozen=True)
class KIVI(QuantizedStore):
    bits: int = 2
    group_size: int = 32  # G
    residual: int = 128  # R
    per_channel_keys = True

    def __post_init__(self):
        if self.residual <= 0 or self.residual % self.group_size:
            raise UserError(f"KIVI's residual ({self.residual}) must be a positive multiple of "
                            f"its group size ({self.group_size})")

    def quantize_keys(self, x):
        return quantize_per_channel(x, self.bits, self.group_size, x.dtype)

    def quantize_values(self, x):
        return quantize_per_token(x, self.bits, min(self.group_size, x.shape[-1]), x.dtype)
