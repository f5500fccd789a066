"""Export for TF-Serving: `export_model` writes the SavedModel, `export.client` calls it over gRPC."""

from export.saved_model import LIKELIHOOD_OUTPUTS, ServingModule, export_model, signature_summary

__all__ = ["LIKELIHOOD_OUTPUTS", "ServingModule", "export_model", "signature_summary"]
