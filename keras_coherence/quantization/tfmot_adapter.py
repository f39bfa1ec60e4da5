"""Run a PO2 quantizer inside tfmot quantization-aware training.

``TFMOTQuantizer`` implements the ``tfmot.quantization.keras.quantizers.Quantizer``
interface on top of any ``PO2Quantizer``: ``build(tensor_shape, name, layer)`` creates
the quantizer's variables with ``layer.add_weight`` (so they belong to the
``QuantizeWrapper`` and are saved with it) and returns them as a dict;
``__call__(inputs, training, weights)`` quantizes with those variables. The helpers
``exponent``, ``scale``, ``integer_codes``, ``freeze`` and ``unfreeze`` take that dict.

>>> import tensorflow_model_optimization as tfmot
>>> tq = TFMOTQuantizer("msqe_po2")
>>> isinstance(tq, tfmot.quantization.keras.quantizers.Quantizer)
True
>>> holder = keras.layers.Layer()
>>> weights = tq.build(tf.TensorShape([3, 2]), "kernel", holder)
>>> sorted(weights)
['exponent', 'frozen', 'initialized', 'm2']
>>> y = tq(tf.constant([[0.3, -0.2], [0.1, 0.7], [-0.5, 0.05]]), True, weights)
>>> tq.exponent(weights).numpy().ravel().tolist()
[-3]
"""
import tensorflow_model_optimization as tfmot

from keras_coherence._internals.keras_private import own_trainable_weights
from keras_coherence._keras import keras, tf  # noqa: F401  (keras/tf used in the doctest)
from keras_coherence.quantization import quantizers as _quantizers

__all__ = ["TFMOTQuantizer"]


@keras.utils.register_keras_serializable(package="keras_coherence")
class TFMOTQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
    """tfmot ``Quantizer`` adapter for ``MSQEPo2Baseline``, ``MSQEPo2`` and ``LearnedPo2``.

    Args:
        quantizer: a ``PO2Quantizer``, an alias (``"msqe_po2"``), or a config dict.
            The instance only supplies configuration and math; it is never built.
    """

    def __init__(self, quantizer="msqe_po2"):
        self.quantizer = _quantizers.get(quantizer)
        if self.quantizer is None:
            raise ValueError("TFMOTQuantizer needs a quantizer")

    def build(self, tensor_shape, name, layer):
        _inner_weights_first(layer)
        return self.quantizer.create_state(tensor_shape, layer.add_weight, prefix=name)

    def __call__(self, inputs, training, weights, **kwargs):
        return self.quantizer.quantize(inputs, training, weights)

    def get_config(self):
        return {"quantizer": _quantizers.serialize(self.quantizer)}

    @classmethod
    def from_config(cls, config):
        return cls(_quantizers.deserialize(config["quantizer"]))

    def exponent(self, weights):
        return self.quantizer.exponent(weights)

    def scale(self, weights):
        return self.quantizer.scale(weights)

    def integer_codes(self, inputs, weights):
        return self.quantizer.integer_codes(inputs, weights)

    def freeze(self, weights, inputs=None):
        self.quantizer.freeze(inputs, weights)

    def unfreeze(self, weights):
        self.quantizer.unfreeze(weights)

    def __eq__(self, other):
        return type(other) is type(self) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = object.__hash__


def _inner_weights_first(wrapper):
    """Keeps a ``QuantizeWrapperV2``'s weight order independent of how it was built.

    ``QuantizeWrapperV2.build`` lists the wrapped layer's trainable weights first only
    if that layer was built before wrapping (the ``quantize_apply`` path), not when a
    saved model is rebuilt from its config; a trainable quantizer variable (the
    ``LearnedPo2`` log2-scale) then changes position and HDF5 weights load into the
    wrong variables. Listing them before our variables makes both orders agree.
    """
    if not isinstance(wrapper, tfmot.quantization.keras.QuantizeWrapperV2):
        return
    inner, own = wrapper.layer, own_trainable_weights(wrapper)
    if inner.built:
        own.extend(w for w in inner.trainable_weights if not any(w is v for v in own))
