"""Export for TF-Serving: `export_model` writes the SavedModel, `export.client` calls it over gRPC.

The names below load `export.saved_model` (and TensorFlow) on first use, so that
`python -m export.client` checks its command line before TensorFlow starts.
"""

_SAVED_MODEL_NAMES = ("LIKELIHOOD_OUTPUTS", "ServingModule", "export_model", "signature_summary")


def __getattr__(name):
    if name in _SAVED_MODEL_NAMES:
        from export import saved_model

        return getattr(saved_model, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")


__all__ = list(_SAVED_MODEL_NAMES)
