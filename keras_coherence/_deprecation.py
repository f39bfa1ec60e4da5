"""Old public names kept, for one release, after a rename."""
from __future__ import annotations

import functools
import sys
import warnings

#: The release that drops the aliases made here.
REMOVED_IN = "0.2.0"


def deprecated_alias(old_name: str, new):
    """The function ``new`` under its old name ``old_name`` (dotted, as users import it):
    each call warns with a ``DeprecationWarning`` naming ``new``, then calls it.

    ``new`` is looked up on its module at call time, so the alias is always what the new
    name is (a test that patches the new name patches the alias too).
    """
    module, new_name = new.__module__, new.__name__
    where = f"{module}.{new_name}"

    @functools.wraps(new)
    def alias(*args, **kwargs):
        warnings.warn(f"{old_name} is deprecated and will be removed in keras_coherence {REMOVED_IN}; "
                      f"use {where} (same arguments, same result).", DeprecationWarning, stacklevel=2)
        return getattr(sys.modules[module], new_name)(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name.rpartition(".")[2]
    alias.__doc__ = f"Deprecated alias of :func:`{where}`, removed in {REMOVED_IN}."
    return alias
