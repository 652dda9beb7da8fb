"""duquant: DuQuant post-training quantization (W4A8) for pi0 / pi0.5 policies and any PyTorch model."""

__version__ = "0.1.0"

from duquant.config import PRESETS, ConfigError, DuQuantConfig  # noqa: E402


def __getattr__(name: str):
    # The engine imports torch; keep `import duquant` light for the torch-free LIBERO client.
    if name in ("quantize", "apply_from_env", "QuantReport"):
        from duquant import api

        return getattr(api, name)
    if name == "DuQuantLinear":
        from duquant.layers import DuQuantLinear

        return DuQuantLinear
    if name == "report_model":
        from duquant.report import report_model

        return report_model
    raise AttributeError(f"module 'duquant' has no attribute {name!r}")


__all__ = ["DuQuantConfig", "ConfigError", "PRESETS", "quantize", "apply_from_env", "QuantReport", "DuQuantLinear",
           "report_model", "__version__"]
