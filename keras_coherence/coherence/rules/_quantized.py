"""Kernels read through larq quantizers: the value used in the forward pass and the
diagonal of its Jacobian (the straight-through-estimator multiplier)."""
from keras_coherence._keras import tf
from keras_coherence.coherence.registry import NotSupported

try:  # larq is a dependency, but keep the rules importable without it
    import larq as lq

    _ELEMENTWISE = (
        lq.quantizers.SteSign,
        lq.quantizers.ApproxSign,
        lq.quantizers.SwishSign,
        lq.quantizers.SteHeaviside,
        lq.quantizers.DoReFa,
        lq.quantizers.MagnitudeAwareSign,
        lq.quantizers.NoOp,
    )
except ImportError:  # pragma: no cover
    _ELEMENTWISE = ()


def check_quantizer(layer, attr: str) -> None:
    quantizer = getattr(layer, attr, None)
    if quantizer is not None and not isinstance(quantizer, _ELEMENTWISE):
        raise NotSupported(
            f"{attr}={type(quantizer).__name__} is not a known element-wise quantizer"
        )


def read_kernel(layer, name: str = "kernel", quantizer_attr: str = "kernel_quantizer"):
    """Returns ``(w_used, ste)``: the kernel as the forward pass uses it, and the
    element-wise derivative d w_used / d latent (``None`` when it is 1)."""
    variable = getattr(layer, name)
    latent = tf.convert_to_tensor(getattr(variable, "latent_variable", variable))
    quantizer = getattr(layer, quantizer_attr, None)
    if quantizer is None:
        return latent, None
    with tf.GradientTape() as tape:
        tape.watch(latent)
        used = quantizer(latent)
    # Element-wise quantizers have a diagonal Jacobian, so d(sum used)/d latent is it.
    return used, tape.gradient(used, latent)


def quantize_input(layer, x):
    quantizer = getattr(layer, "input_quantizer", None)
    return x if quantizer is None else quantizer(x)
