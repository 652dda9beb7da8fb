"""Quantization formats: what a quantized layer stores, how its fake-quant reference computes, and which GPU
backend runs it. Registered in one place; adding a format is one new module in this package (it calls
``register``), no if-chain anywhere.

Built in (``names()``):

- ``w{2,3,4,8}a{4,8}`` (``int_act.py``): integer weights, per-token integer activations after the layer's online
  transform (DuQuant, SmoothQuant, Hadamard, RTN); gpu backend: the Triton integer kernels (8-bit activations).
- ``w{2,3,4,8}a16`` (``weight_only.py``): integer weights, activations stay bf16, no online transform expected
  (``w4a16``: the action expert at M ~ 51 is bound by weight bytes); gpu backend: a Triton bf16 x packed-int4 GEMM.
- ``w8a8-fp8`` (``fp8.py``): FP8 e4m3 weights (per output channel) and activations (per token); gpu backend:
  ``torch._scaled_mm`` rowwise.
- ``w4a8-fp8`` (``int4_fp8.py``): w4a8's 4-bit integer weights with FP8 e4m3 activations (per token); gpu backend:
  the Triton int4 x FP8 GEMM (each weight nibble read as the e4m3 number n * 2^-9).

Each format says what its activations are (``Format.activations``): a report row of an fp8 or bf16-activation
format is labelled by its name and its activation type, never as int8.

Import direction: ``kernels`` (math and GPU kernels, knows no layer class) <- ``formats`` <- ``layers`` <- ``api``.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch
import torch.nn.functional as F

__all__ = ["Format", "FormatError", "get", "name_for_bits", "names", "register"]


class FormatError(ValueError):
    """Unknown format name, or a layer / setting the format cannot hold."""


class Format:
    """One quantization format. Subclasses set the class attributes and override what differs.

    A layer (``layers.DuQuantLinear``) holds: ``qweight`` / ``w_scale`` / ``w_zero`` buffers in the format's
    storage, ``transform`` (the online activation transform), ``abits``, ``act_symmetric``, ``act_clip``, bias,
    and its format's name; it calls the methods below."""

    name: str = ""
    weights: str = ""  # storage of the weights, e.g. "int4", "int8", "fp8-e4m3"
    activations: str = ""  # what the GEMM multiplies: "int8", "int4", "bf16", "fp8-e4m3"
    online_transform: bool = True  # whether a non-identity activation transform belongs to this format
    wbits: int = 0  # weight bits
    abits: int = 16  # activation bits (16: the activations stay in float)
    description: str = ""

    # ---- weights --------------------------------------------------------------------------------------------
    def quantize_weight(self, w: torch.Tensor, *, bits: int, symmetric: bool = False, clip=1.0,
                        group_size: int | None = None):
        """w [N, K] float (transform already folded in) -> a weight container (``QuantizedWeight``-like: bits,
        symmetric, group_size, scale, zero, packed(), dequantize())."""
        from duquant.quantizers import quantize_weight

        return quantize_weight(w, bits, symmetric=symmetric, clip=clip, group_size=group_size)

    def weight_from_buffers(self, layer):
        """The layer's stored buffers as a weight container (``dequantize(dtype)`` gives [N, K])."""
        from duquant.quantizers import QuantizedWeight

        return QuantizedWeight.from_packed(layer.qweight, layer.w_scale, layer.w_zero, bits=layer.wbits,
                                           symmetric=layer.w_symmetric, group_size=layer.w_group_size,
                                           shape=(layer.out_features, layer.in_features))

    # ---- fake-quant reference (CPU and CUDA) ----------------------------------------------------------------
    def quantize_input(self, layer, x: torch.Tensor) -> torch.Tensor:
        """Online transform + activation quantize-dequantize, float32 (what the GEMM sees)."""
        raise NotImplementedError

    def fake_linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The reference matmul in x's dtype: quantize_input(x) @ dequantized weight^T (the layer adds its output
        rotation and bias)."""
        return F.linear(self.quantize_input(layer, x).to(x.dtype), layer.dequantized_weight(x.dtype))

    def reference(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The function the gpu backend computes, in float32 on x's device (its tests compare against this)."""
        xq = self.quantize_input(layer, x.float())
        y = xq @ self.weight_from_buffers(layer).dequantize(torch.float32).T
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.reshape(*x.shape[:-1], layer.out_features)

    # ---- gpu backend ----------------------------------------------------------------------------------------
    def gpu_group_key(self, layer) -> tuple:
        """Layers with equal keys share one input and run one activation quantization (q/k/v, gate/up)."""
        return (self.name, id(layer), str(layer.qweight.device))

    def gpu_prepare(self, layers: list, share_storage: bool = True) -> list:
        """Kernel state per layer of a group (also stored as ``layer._gpu_state``); GpuBackendError if it cannot
        run here."""
        raise self.gpu_error(layers[0], "no gpu backend for this format")

    def gpu_forward_geglu(self, state, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gpu_forward of gelu_tanh(gate) * up: inside the activation kernel where the layer's group can
        (``can_fuse_geglu``), else the product first."""
        group = getattr(state, "group", None)
        if getattr(group, "can_fuse_geglu", False):
            return group.output_geglu(gate, up)
        return self.gpu_forward(state, F.gelu(gate, approximate="tanh") * up)

    def gpu_forward(self, state, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gpu_error(self, layer, why: str) -> Exception:
        from duquant.kernels import GpuBackendError

        return GpuBackendError(f"{self.name} layer ({layer.in_features}->{layer.out_features}): {why}")

    def label(self) -> str:
        return f"{self.name} ({self.weights} weights, {self.activations} activations)"

    def __repr__(self) -> str:
        return f"<format {self.label()}>"


_REGISTRY: dict[str, Format] = {}
_LOADED = False


def register(fmt: Format) -> Format:
    """Add a format (called by the format modules of this package at import)."""
    if not fmt.name:
        raise FormatError(f"{type(fmt).__name__} has no name")
    if fmt.name in _REGISTRY and type(_REGISTRY[fmt.name]) is not type(fmt):
        raise FormatError(f"format {fmt.name!r} registered twice ({type(_REGISTRY[fmt.name]).__name__}, "
                          f"{type(fmt).__name__})")
    _REGISTRY[fmt.name] = fmt
    return fmt


def _load() -> None:
    """Import every module of this package once: each registers its formats."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def get(name: str) -> Format:
    _load()
    fmt = _REGISTRY.get(name)
    if fmt is None:
        raise FormatError(f"unknown format {name!r}; known: {', '.join(names())}")
    return fmt


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def name_for_bits(wbits: int, abits: int) -> str:
    """The integer format a (weight bits, activation bits) setting means: w4a8, w8a8, w4a16 (abits 0 or 16)."""
    return f"w{int(wbits)}a{16 if abits in (0, 16) else int(abits)}"
