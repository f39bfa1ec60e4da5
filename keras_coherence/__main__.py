"""``python -m keras_coherence ...``: the same command line as ``keras-coherence``.

``python -m`` imports the package (hence TensorFlow) before this file runs, so setting
``TF_CPP_MIN_LOG_LEVEL`` here only helps code that runs later; see
:func:`keras_coherence.cli.main` for how the CLI keeps TensorFlow quiet.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_coherence.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m keras_coherence"))
