"""Hardware-friendly power-of-two weight quantizers (Bae, Zielinski, Chatterjee 2022).

``MSQEPo2Baseline`` ("msqe_po2_baseline"), ``MSQEPo2`` ("msqe_po2") and ``LearnedPo2``
("learned_po2") are Keras layers; ``get`` / ``serialize`` / ``deserialize`` resolve
them like Keras activations. ``TFMOTQuantizer`` (imported on first use, it pulls in
tfmot) runs any of them inside tfmot quantization-aware training.
"""
from keras_coherence.quantization.base import PO2Quantizer
from keras_coherence.quantization.quantizers import (
    ALIASES,
    LearnedPo2,
    MSQEPo2,
    MSQEPo2Baseline,
    deserialize,
    get,
    serialize,
)

__all__ = [
    "PO2Quantizer",
    "MSQEPo2Baseline",
    "MSQEPo2",
    "LearnedPo2",
    "TFMOTQuantizer",
    "ALIASES",
    "get",
    "serialize",
    "deserialize",
]


def __getattr__(name):
    if name == "TFMOTQuantizer":
        from keras_coherence.quantization.tfmot_adapter import TFMOTQuantizer

        return TFMOTQuantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
