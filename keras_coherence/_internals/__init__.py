"""The only modules of the package that reach into private TensorFlow, tf_keras, tfmot or
LiteRT code: ``tf_keras.src``, ``tensorflow.python``, ``tf.__internal__``,
``tensorflow_model_optimization.python`` and the underscored attributes of their objects.

Each module wraps one library's internals behind functions named for what they give, and
says which version's behaviour it relies on (TensorFlow / tf_keras 2.21, tfmot 0.8). When
an upgrade moves one of them, the fix is here and nowhere else;
``tests/test_architecture.py`` checks that no other module names them.
"""
