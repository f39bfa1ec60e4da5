"""The allowed import directions of docs/architecture.md, read from the source (ast):

* ``edge/`` imports nothing of ours and no TensorFlow, Keras, larq or tfmot: it runs a
  ``.tflite`` with LiteRT and numpy only;
* ``keras_coherence/coherence/`` imports nothing of ``quantization``, ``binary``, the
  command line or the experiment scripts;
* nothing in the library imports the application layer (``workflows/``, ``cli``);
* no module outside ``keras_coherence/_internals/`` (in the library, the examples and the
  benchmarks) imports or names a private TensorFlow, tf_keras or tfmot module, or reads a
  LiteRT interpreter's private methods.
"""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

HEAVY = ("tensorflow", "tf_keras", "keras", "larq", "tensorflow_model_optimization", "keras_coherence")
FORBIDDEN = {
    "edge": HEAVY,
    "keras_coherence/coherence": ("keras_coherence.quantization", "keras_coherence.binary",
                                  "keras_coherence.cli", "keras_coherence.experiments", "keras_coherence.workflows"),
    "keras_coherence": ("keras_coherence.cli", "keras_coherence.workflows"),
}
# The application layer may import the library and itself: the workflows, the command
# line, its entry point, and the deprecated re-export of the experiments' helpers.
APPLICATION = ("keras_coherence/workflows/", "keras_coherence/cli.py", "keras_coherence/__main__.py",
               "keras_coherence/experiments.py")


def imported_modules(source: str, module: str, is_package: bool = False):
    """Absolute names of every module ``source`` (the module ``module``) imports,
    anywhere in it (function-level imports included); ``from a import b`` yields
    ``a`` and ``a.b`` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT):
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _violations(folder, forbidden):
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(APPLICATION):
            continue
        module, is_package = _module_name(path)
        for name in imported_modules(path.read_text(), module, is_package):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{rel} imports {name}")
    return found


PRIVATE_MODULES = ("tf_keras.src", "tensorflow.python", "tensorflow_model_optimization.python")
INTERPRETER_PRIVATES = ("_get_ops_details", "_get_op_details", "_get_tensor_details", "_get_full_signature_list",
                        "_subgraph_index")
INTERNALS = "keras_coherence/_internals"
PRIVATE_FREE = ("keras_coherence", "examples", "benchmarks")


def private_uses(source: str, module: str, is_package: bool = False):
    """The private modules (``PRIVATE_MODULES`` and below) ``source`` imports, or names
    anywhere in its text (code, strings, comments), and the LiteRT interpreter privates
    (``INTERPRETER_PRIVATES``) it reads as an attribute or names in a string (``getattr``)."""
    found = {name for name in imported_modules(source, module, is_package)
             if any(name == p or name.startswith(p + ".") for p in PRIVATE_MODULES)}
    found.update(p for p in PRIVATE_MODULES if re.search(r"\b" + re.escape(p) + r"\b", source))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in INTERPRETER_PRIVATES:
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and node.value in INTERPRETER_PRIVATES:
            found.add(node.value)
    return found


def _private_uses_outside_internals(root, folder):
    found = []
    for path in sorted((root / folder).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(INTERNALS + "/"):
            continue
        module, is_package = _module_name(path, root)
        for name in sorted(private_uses(path.read_text(), module, is_package)):
            found.append(f"{rel} uses {name}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_directions(folder):
    assert (ROOT / folder).is_dir()
    assert _violations(folder, FORBIDDEN[folder]) == []


def test_the_checker_sees_every_import_form():
    """A violation in each form the checker must catch (so the test above can fail)."""
    source = (
        "import tensorflow as tf\n"
        "from keras_coherence import cli\n"
        "def f():\n"
        "    from ..binary import ops\n"
        "from . import stats\n"
    )
    names = imported_modules(source, "keras_coherence.coherence.engine")
    assert {"tensorflow", "keras_coherence.cli", "keras_coherence.binary.ops",
            "keras_coherence.coherence.stats"} <= names
    assert "keras_coherence.binary" in imported_modules("from .. import binary\n",
                                                        "keras_coherence.coherence", is_package=True)


@pytest.mark.parametrize("folder", PRIVATE_FREE)
def test_private_internals_only_in_internals(folder):
    assert (ROOT / folder).is_dir()
    assert _private_uses_outside_internals(ROOT, folder) == []


def test_the_private_checker_catches_each_form(tmp_path):
    """Each way of reaching a private the checker must catch (so the test above can fail),
    and a planted file is reported outside ``_internals/`` and not inside it."""
    planted = {
        "from tf_keras.src.engine import functional\n": {"tf_keras.src", "tf_keras.src.engine",
                                                          "tf_keras.src.engine.functional"},
        "from tensorflow import python\n": {"tensorflow.python"},
        "import tensorflow_model_optimization.python.core\n": {"tensorflow_model_optimization.python",
                                                               "tensorflow_model_optimization.python.core"},
        "import importlib\nimportlib.import_module('tf_keras.src.losses')\n": {"tf_keras.src"},
        "def f(interp):\n    return interp._get_ops_details()\n": {"_get_ops_details"},
        "def f(runner):\n    return getattr(runner, '_subgraph_index')\n": {"_subgraph_index"},
        "import tensorflow as tf\nx = tf.python_io\n": set(),
    }
    for source, names in planted.items():
        assert private_uses(source, "keras_coherence.x") == names, source
    for rel in ("keras_coherence/quantization/leaky.py", "keras_coherence/_internals/fine.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("from tensorflow.python.util import _pywrap_util_port\n")
    assert _private_uses_outside_internals(tmp_path, "keras_coherence") == [
        "keras_coherence/quantization/leaky.py uses tensorflow.python",
        "keras_coherence/quantization/leaky.py uses tensorflow.python.util",
        "keras_coherence/quantization/leaky.py uses tensorflow.python.util._pywrap_util_port",
    ]


def test_lazy_subpackages_are_attributes():
    """``kc.quantization`` and friends work without an explicit import, and a plain
    ``import keras_coherence`` does not load them (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, keras_coherence as kc\n"
            "heavy = [m for m in ('keras_coherence.quantization', 'keras_coherence.binary', 'larq', 'tensorflow_model_optimization', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(kc.quantization.quantize_model) and callable(kc.models.small_cnn)\n"
            "assert kc.binary.__name__ == 'keras_coherence.binary'\n"
            "assert 'quantization' in dir(kc)\n"
            "assert kc.callbacks.ScaleMonitor.__module__ == 'keras_coherence.quantization.monitor'\n"
            "assert kc.callbacks.SubsetAccuracy.__name__ == 'SubsetAccuracy' and kc.callbacks.StepTimer\n"
            "try:\n    kc.nonexistent\nexcept AttributeError as e:\n    assert 'nonexistent' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(__import__("os").environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
