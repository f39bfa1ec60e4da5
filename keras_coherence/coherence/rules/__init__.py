"""Per-layer rules; importing this package registers them all."""
from keras_coherence.coherence.rules import dense, conv, normalization, embedding, einsum, attention  # noqa: F401
