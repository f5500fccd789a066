"""One traced function per model and setting, shared by every tool that runs a model's graph.

Samplers, likelihoods, conditional generation and the compression codec each wrap a model's
computation in a `tf.function`. Built anew on every call, such a function would trace (and, on
a CPU, pick its kernels) again each time; kept here, keyed by the model and the setting (sampler
name, tolerances, batch shape...), it traces once and later calls run the same graph, so the
same seed gives the same numbers. The cache holds models weakly: it never keeps one alive.
"""

import weakref

_traced = weakref.WeakKeyDictionary()  # model -> {setting: tf.function}


def compiled(model, key, build):
    """The traced function of (model, key); `build()` makes it on the first call.

    Args:
        model: the model the function runs (the cache's weak key).
        key: a hashable description of the setting, e.g. `("ode", rtol, atol)`.
        build: a function of no arguments that returns the `tf.function`.
    """
    functions = _traced.setdefault(model, {})
    if key not in functions:
        functions[key] = build()
    return functions[key]
