"""Lazy package attributes (PEP 562): submodules and names imported on first use.

`vdm_tf` and `vdm_tf.compression` load their modules only when a name is asked for, so that
`import vdm_tf` imports no TensorFlow and a command line can check its arguments first.
"""

import importlib


def attributes(package, namespace, modules, names):
    """(`__getattr__`, `__dir__`) for a package's `__init__.py`.

    Args:
        package: the package's `__name__`.
        namespace: its `globals()`, listed by `__dir__` with the lazy names.
        modules: submodule names, imported as `package.module`.
        names: {name: submodule that defines it}.

    Example (in a package's `__init__.py`):
    >>> __getattr__, __dir__ = _lazy.attributes(__name__, globals(), ("codec",), {"BitsBackCodec": "codec"})
    """

    def __getattr__(name):
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(modules) | set(names))

    return __getattr__, __dir__
