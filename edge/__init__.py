"""The device side: LiteRT + numpy only (never TensorFlow or keras_coherence).

``python -m edge train|infer`` (``edge.__main__``) runs a training model exported by
``keras_coherence.binary.export_training``; ``edge.runner`` holds the pieces.
"""
