"""GPU kernels for the ``gpu`` backend of DuQuantLinear, and their eager specification.

Public API (importing this package never needs triton or CUDA; the kernels load on first use):

- ``gpu_available() -> (ok, reason)``: whether the kernels can run here, and why not (no CUDA, no triton,
  compute capability < 8.0).
- ``prepare_gpu_model(model)``: builds the kernel state of every quantized layer in a model (any module with
  ``gpu_group_key()`` / ``prepare_gpu_group()``, i.e. ``layers.DuQuantLinear``: its format picks the backend),
  grouping the layers that share an input (same transform object: q/k/v, gate/up) so their activation transform +
  quantization runs once and their GEMMs run as one fused GEMM. Call it after ``model.cuda()``; layers not
  prepared this way are prepared alone on their first forward.
- ``prepare_gpu_linear(layer_or_layers) -> GpuLinearState`` (or a list of states for a group): the integer
  kernels' state of layers with 8-bit integer activations (duck-typed: this package knows no layer class).
- ``gpu_linear(x, state) -> y``: the layer's output (x's dtype), what ``DuQuantLinear.forward`` calls when
  ``backend == "gpu"``.
- ``reference``: the eager torch spec of the kernels (CPU reference path).

A backend that cannot run raises ``GpuBackendError`` naming why; nothing falls back silently.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch

from duquant.kernels import reference  # noqa: F401  (eager spec, always importable)

__all__ = [
    "GpuBackendError",
    "SharedInputGroup",
    "GpuLinearGroup",
    "GpuLinearState",
    "check_gpu",
    "gpu_available",
    "gpu_linear",
    "prepare_gpu_linear",
    "prepare_gpu_model",
    "reference",
]


class GpuBackendError(RuntimeError):
    """The gpu backend cannot run this layer / on this machine (the message says why)."""


def gpu_available() -> tuple[bool, str]:
    """(True, description) when the Triton kernels can run on the current CUDA device, else (False, reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import triton
    except ImportError:
        return False, "triton is not installed (pip install 'duquant[gpu]')"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; the int8 "
                       "tensor-core kernels need 8.0 or newer")
    return True, f"{torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, triton " \
                 f"{triton.__version__}"


def check_gpu() -> None:
    """Raise GpuBackendError naming why the kernels cannot run here."""
    ok, why = gpu_available()
    if not ok:
        raise GpuBackendError(f"backend 'gpu' cannot run: {why}. Use --backend fake (OPENPI_DUQUANT_BACKEND=fake) "
                              "for the reference path.")


# ---- state --------------------------------------------------------------------------------------------------------

SUPPORTED_WBITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (64, 128, 256, 512)


def _check_layer(layer) -> None:
    name = f"{layer.__class__.__name__}({layer.in_features}->{layer.out_features}, W{layer.wbits}A{layer.abits})"
    if layer.abits != 8:
        raise GpuBackendError(f"{name}: the gpu backend runs 8-bit activations only (abits={layer.abits})")
    if getattr(layer, "act_static", None) is not None:
        raise GpuBackendError(f"{name}: static activation scales are not implemented by the gpu backend")
    if getattr(layer, "out_rotation", None) is not None:
        raise GpuBackendError(f"{name}: the output-side rotation (ROW_ROT=restore) is not implemented by the gpu "
                              "backend; use ROW_ROT=0")
    if layer.wbits not in SUPPORTED_WBITS:
        raise GpuBackendError(f"{name}: no integer kernel for {layer.wbits}-bit weights")
    gs = getattr(layer, "w_group_size", None)
    if gs is not None and gs not in SUPPORTED_GROUPS:
        raise GpuBackendError(f"{name}: weight group size {gs} not supported by the gpu kernels "
                              f"(use one of {SUPPORTED_GROUPS} or per-channel)")
    if not layer.qweight.is_cuda:
        raise GpuBackendError(f"{name}: buffers are on {layer.qweight.device}; move the model with .cuda()")


def _weight_kind(layer) -> int:
    from duquant.kernels.triton_gemm import W_INT4, W_INT8, W_UINT8

    if layer.wbits <= 4:
        return W_INT4
    return W_INT8 if layer.w_symmetric else W_UINT8


def _gemm_weight(layers: list, share_storage: bool, kind: int | None = None):
    """One GemmWeight over the rows of `layers` (same kind, K, group size). With share_storage the members'
    qweight / w_scale / w_zero buffers become views of the concatenated tensors (no second copy). ``kind``: the
    GEMM's operand kind when the format decides it (``W_INT4_FP8``: the same packed int4 storage, FP8 activations);
    default: what the weight bits and symmetry mean with int8 activations."""
    from duquant.kernels.triton_gemm import GemmWeight

    first = layers[0]
    k = first.in_features
    kind = _weight_kind(first) if kind is None else kind
    gs = getattr(first, "w_group_size", None)
    scales, zeros, colsums, biases = [], [], [], []
    for layer in layers:
        iw = reference.int_weight_from_layer(layer)
        scales.append(iw.scale.float())
        zeros.append(iw.zero.round().to(torch.int32))
        cs = iw.colsum.float() if gs is None else (iw.colsum.float() * iw.scale.float()).sum(1, keepdim=True)
        colsums.append(cs)
        b = layer.bias
        biases.append(None if b is None else b.detach().float())
        del iw
    if len(layers) == 1:
        data = first.qweight
    else:
        data = torch.cat([layer.qweight for layer in layers])
        if share_storage:
            off = 0
            for layer in layers:
                n = layer.out_features
                layer.qweight = data[off:off + n]
                off += n
    if kind in (0, 1) and data.dtype != (torch.int8 if kind == 0 else torch.uint8):
        data = data.view(torch.int8 if kind == 0 else torch.uint8)
    scale = torch.cat(scales)
    zero = torch.cat(zeros)
    if gs is None:
        scale, zero = scale.reshape(-1).contiguous(), zero.reshape(-1).contiguous()
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(layer.out_features, device=data.device)
                          for b, layer in zip(biases, layers)])
    return GemmWeight(data=data, kind=kind, N=sum(la.out_features for la in layers), K=k, scale=scale,
                      zero=zero.contiguous(), colsum=torch.cat(colsums).reshape(-1).contiguous(), bias=bias,
                      group_size=gs, splits=tuple(la.out_features for la in layers))


@dataclass
class GpuLinearState:
    """A layer's handle on its group's kernels (a group of one for a lone layer)."""
    group: GpuLinearGroup
    index: int
    in_features: int
    out_features: int

    def resident_bytes(self) -> int:
        """This layer's share of the kernel-layout bytes (weights in their stored format, scales, zero points,
        weight column sums, bias) plus its share of the group's transform tables."""
        return self.group.resident_bytes() * self.out_features // max(1, self.group.out_total)


class SharedInputGroup:
    """Layers fed the same tensor (q/k/v, gate/up): the first member called with an input computes every member's
    output (``forward_all``) and the others pick theirs up (identity + version check on x, which the group keeps
    until all members took their output). Plain Python around launches: eager and CUDA-graph capture alike."""
    layers: list
    in_features: int
    _cache = None
    can_fuse_geglu = False  # whether forward_all takes a GeGLU gate and up in place of the input (output_geglu)

    def forward_all(self, x2: torch.Tensor, up2: torch.Tensor | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def output_geglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The output of a one-member group (a GeGLU MLP's down projection) for the input gelu_tanh(gate) * up,
        that product computed inside the activation kernel: it is never written to memory."""
        if not self.can_fuse_geglu or len(self.layers) != 1:
            raise GpuBackendError("this group's activation kernel cannot take a GeGLU gate and up "
                                  "(one-member groups with a folded-kernel plan: permute=shuffle)")
        y = self.forward_all(gate.reshape(-1, self.in_features), up.reshape(-1, self.in_features))[0]
        return y.reshape(*gate.shape[:-1], y.shape[-1])

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member `index`'s output for x; the first member asked computes all of them for this x."""
        if len(self.layers) == 1:
            return self.forward_all(x.reshape(-1, self.in_features))[0]
        c = self._cache
        if c is None or c[0] is not x or c[1] != x._version:
            outs = self.forward_all(x.reshape(-1, self.in_features))
            c = self._cache = [x, x._version, outs, set()]
        c[3].add(index)
        y = c[2][index]
        if len(c[3]) == len(self.layers):
            self._cache = None  # every member has its output: drop the references
        return y


@dataclass
class GpuLinearGroup(SharedInputGroup):
    """Layers sharing one input: one activation transform + quantization, one fused GEMM per weight format."""
    layers: list
    share_storage: bool = True
    precision: str = field(default_factory=lambda: os.environ.get("DUQUANT_ACT_PRECISION", ""))
    variant: str | None = None
    # activation kernel: "tile" (triton_act_tile; default: 20 vs 28.5 us at 816x2048, 155 vs 321 us at 816x16384 on
    # an H100, BENCHMARKS.md), "fused" (triton_act), "split" (triton_act, three launches)
    act_impl: str = field(default_factory=lambda: os.environ.get("DUQUANT_ACT_IMPL", "tile"))

    def __post_init__(self):
        from duquant.kernels.triton_act import build_act_plan
        from duquant.kernels.triton_act_tile import can_fuse_geglu, cannot_run

        first = self.layers[0]
        for layer in self.layers:
            _check_layer(layer)
            if layer.in_features != first.in_features:
                raise GpuBackendError("layers of one group must have the same input width")
        self.in_features = first.in_features
        self.symmetric = bool(first.act_symmetric)
        self.clip = float(first.act_clip)
        self.plan = build_act_plan(first.transform, first.in_features, first.qweight.device)
        if self.act_impl not in ("fused", "split", "tile"):
            raise GpuBackendError(f"DUQUANT_ACT_IMPL={self.act_impl!r}: use fused, split or tile")
        # tile: fp16 operands with per-token power-of-two scaling round like tf32, at twice its rate
        self.precision = self.precision or ("fp16" if self.act_impl == "tile" else "tf32")
        # What the tile kernel cannot run (float32 rotations of a partial last block, K = 4304: shared memory)
        # goes to the fused kernel.
        self.use_tile = self.act_impl == "tile" and cannot_run(self.plan, self.precision) is None
        self.can_fuse_geglu = len(self.layers) == 1 and self.use_tile and can_fuse_geglu(self.plan, self.precision)
        self.out_total = sum(la.out_features for la in self.layers)
        # fuse members with the same weight format
        sets: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers):
            sets.setdefault((_weight_kind(layer), getattr(layer, "w_group_size", None)), []).append(i)
        self.gemms = [(idx, _gemm_weight([self.layers[i] for i in idx], self.share_storage))
                      for idx in sets.values()]
        self._cache = None
        self._layer_refs = [weakref.ref(la) for la in self.layers]

    def resident_bytes(self) -> int:
        return sum(w.num_bytes() for _, w in self.gemms) + self.plan.num_bytes()

    def forward_all(self, x2: torch.Tensor, up2: torch.Tensor | None = None) -> list[torch.Tensor]:
        from duquant.kernels.triton_gemm import int_gemm

        outs: list = [None] * len(self.layers)
        acts: dict[str, tuple] = {}
        for idx, w in self.gemms:
            layout = w.act_layout
            if layout not in acts:
                acts[layout] = self._act(x2, layout, up2)
            codes, sx, zx, rs = acts[layout]
            ys = int_gemm(codes, sx, zx, rs, w, out_dtype=x2.dtype, variant=self.variant)
            for i, y in zip(idx, ys):
                outs[i] = y
        return outs

    def _act(self, x2: torch.Tensor, layout: str, up2: torch.Tensor | None = None):
        if self.use_tile:
            from duquant.kernels.triton_act_tile import act_quant_tile

            return act_quant_tile(x2, self.plan, symmetric=self.symmetric, clip=self.clip, layout=layout,
                                  precision=self.precision, up=up2)
        if up2 is not None:
            raise GpuBackendError("the GeGLU input fusion needs the tile / folded activation kernel")
        from duquant.kernels.triton_act import act_quant

        impl = "fused" if self.act_impl == "tile" else self.act_impl
        precision = "tf32" if self.precision == "fp16" else self.precision
        return act_quant(x2, self.plan, symmetric=self.symmetric, clip=self.clip, layout=layout,
                         precision=precision, impl=impl)


def prepare_gpu_linear(layer_or_layers, share_storage: bool = True):
    """Kernel state of one DuQuantLinear (-> GpuLinearState) or of layers sharing an input (-> list of states,
    also stored on each layer as ``_gpu_state``). Uses the layers' packed buffers as they are."""
    check_gpu()
    layers = list(layer_or_layers) if isinstance(layer_or_layers, (list, tuple)) else [layer_or_layers]
    group = GpuLinearGroup(layers, share_storage=share_storage)
    states = [GpuLinearState(group, i, la.in_features, la.out_features) for i, la in enumerate(layers)]
    for la, st in zip(layers, states):
        la._gpu_state = st
    return states if isinstance(layer_or_layers, (list, tuple)) else states[0]


def prepare_gpu_model(model: torch.nn.Module, share_storage: bool = True) -> dict:
    """Prepare every quantized layer of `model` for the gpu backend: modules with ``gpu_group_key()`` are grouped
    by it (layers sharing a transform object and activation settings) and each group is prepared by its first
    member's ``prepare_gpu_group`` (the layer's format picks the kernels). Returns {module name: state}."""
    check_gpu()
    groups: dict[tuple, list[tuple[str, torch.nn.Module]]] = {}
    for name, mod in model.named_modules():
        key = getattr(mod, "gpu_group_key", None)
        if callable(key):
            groups.setdefault(key(), []).append((name, mod))
    out = {}
    for members in groups.values():
        mods = [m for _, m in members]
        states = mods[0].prepare_gpu_group(mods, share_storage=share_storage)
        out.update({n: s for (n, _), s in zip(members, states)})
    return out


def gpu_linear(x: torch.Tensor, state: GpuLinearState) -> torch.Tensor:
    """y = layer(x) through the kernels (x [..., in_features] on CUDA; y in x's dtype)."""
    if not x.is_cuda:
        raise GpuBackendError("backend 'gpu' needs CUDA inputs")
    if x.shape[-1] != state.in_features:
        raise ValueError(f"expected {state.in_features} input features, got shape {tuple(x.shape)}")
    y = state.group.output(x, state.index)
    return y.reshape(*x.shape[:-1], state.out_features)
