"""Weight quantization: functions -> quantizer modules -> quantized layers."""

from mq.quant.functions import clipped_ste
from mq.quant.layers import (
    QuantizedModel,
    plain_state_dict,
    quantize_model,
    quantized_weights,
    unwrap,
)
from mq.quant.quantizers import BWNWeight, DorefaWeight, WeightQuantizer

__all__ = [
    "QuantizedModel",
    "unwrap",
    "BWNWeight",
    "DorefaWeight",
    "WeightQuantizer",
    "clipped_ste",
    "plain_state_dict",
    "quantize_model",
    "quantized_weights",
]
