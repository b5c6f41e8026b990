"""Inference paths for the expansion layers: the fastest exact way to run them on a device, chosen once.

A layer's default forward is its factors as plain ``nn.Conv2d`` modules, in the tensor's own memory format.
``layer.optimise_for(device, input_shape)`` (or :func:`optimise` for a whole model) picks, once, a path that
computes the same function faster on that device, and builds it from a snapshot of the layer's weights.
Every path agrees with the default forward to float32 rounding (``tests/test_speed_paths.py``: relative
error < 1e-5).

What is kept on CPU, each measured with ``benchmarks/layer_speed.py`` (interleaved ratios; numbers in
``docs/schemes.md``, "Speed on CPU"):

- **channels_last**: every stage runs on NHWC tensors and returns one. oneDNN's NCHW path reorders the
  input and output to a blocked layout on every call; the NHWC kernels do not. 1.4 to 1.6x on the
  scheme 2 layers of AlexNet. The output stays channels_last, so the ReLU and pooling after the layer (and
  the next expanded layer) run on NHWC too; :func:`optimise` can put the rest of the model there as well.
- **prepacked oneDNN weights**: ``nn.Conv2d`` reorders its weight into oneDNN's blocked layout on every
  call; a path reorders it once (``mkldnn_reorder_conv2d_weight``) and calls
  ``torch.ops.mkldnn._convolution_pointwise``. 1.1 to 1.4x more on the 1-D convs of scheme 2, most
  where the rank is small.
- **one dense conv instead of the factors, where predicted faster** (scheme 1 mostly): the factors are
  multiplied out (``dense_weight``) and run as one conv, through NNPACK (whose 3x3 and 5x5 convs are 1.1 to
  1.4x faster here than oneDNN's NHWC ones, conversions to and from NCHW included) where it applies, else through
  prepacked oneDNN. The choice is :func:`prefer_dense`: predicted time = MACs / relative MAC rate
  (:data:`CPU_RATES`). Scheme 1 (a grouped basis conv writing a C*M-channel map, then a 1x1 conv
  reading it back) runs at about half the MAC rate of a dense conv, so at the seed's bases the dense conv
  wins on conv3-5. A layer then costs what the original conv costs on the same engine: the
  expansion buys no time there, and the benchmark shows it.

Tried on CPU and not kept (numbers in ``docs/schemes.md``): torch.backends.mkldnn off (NNPACK/im2col
for the 1-D convs: slower), merging a shared basis into a batch-folded dense conv ((B*C, 1, H, W)
with M filters: slower than the grouped conv in NHWC), padding the rank up to a multiple of 8 (no gain
beyond noise), the 1-D convs as im2col + MKL GEMM in NHWC (slower than oneDNN's NHWC kernels), and the
horizontal-first order of scheme 2 (``order="hv"``, a structural option of the layer; no speed difference
beyond noise at stride 1, where both orders cost the same MACs).

On CUDA a layer keeps its default forward (its factors as ``nn.Conv2d``: cuDNN's kernels); what pays
there is how the whole model runs, which :func:`optimise` sets for ``"cuda"``: channels_last parameters
and inputs, ``torch.backends.cudnn.benchmark`` (cuDNN times its algorithms once per shape), the dtype
(bfloat16/float16 under autocast, or the weights cast), a CUDA graph per fixed input shape (one launch
instead of one per kernel: it pays where kernels are short, small batches), and ``torch.compile`` as an
option, applied by the caller to the original and the expansion alike. Those return an
:class:`InferenceModel` wrapper; every one agrees with the default forward within its dtype's rounding
(``tests/test_speed_paths.py`` on CPU, ``tests/test_cuda.py`` on a GPU).

A path is used only where it is valid: CPU float32 input, no autograd graph wanted (``torch.no_grad`` /
``inference_mode``, or nothing requiring grad). Elsewhere, e.g. while fine-tuning, the layer runs its
default forward. If the layer's weights change after the path was built (an optimiser step,
``load_state_dict``), the path rebuilds its snapshot on the next call, so it never runs stale weights.
A path holds no parameters and adds nothing to the state_dict.

This module is long because the CPU paths (engines, per-layer paths) and the whole-model GPU path are one
choice, "how does this model run fastest on that device", made by one :func:`optimise`.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrx.base.errors import UserError

__all__ = ["PATHS", "DTYPES", "CPU_RATES", "NNPACK_MIN_BATCH", "engine_available", "nnpack_batch", "conv_stage",
           "FastPath", "check_path", "cpu_device", "prefer_dense", "nnpack_for", "Optimisable", "expansion_layers",
           "InferenceModel", "optimise", "describe"]

PATHS = ("auto", "default", "factored", "dense")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Relative MAC rates on CPU (MACs per second; a dense oneDNN conv in channels_last = 1.0), measured
# with benchmarks/layer_speed.py on AlexNet conv2-5 at batch 64, 2 threads, AMD EPYC (AVX2): scheme 2's
# 1-D convs 0.78-0.88 (0.56 at rank 20), scheme 1's grouped conv + 1x1 0.42-0.59, NNPACK's dense conv
# 1.1-1.4 (3x3 and 5x5, NHWC conversions included). See docs/schemes.md, "Speed on CPU".
CPU_RATES = {"v2": 0.85, "v1": 0.5, "dense-onednn": 1.0, "dense-nnpack": 1.3}
NNPACK_MIN_BATCH = 16


# ---------------------------------------------------------------------------------- engines


def _probe(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> bool:
    """Whether ``fn(x, w, b)`` runs and matches F.conv2d on a tiny 3x3 problem (private torch ops may be absent)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    w = torch.randn(4, 3, 3, 3, generator=generator)
    b = torch.randn(4, generator=generator)
    try:
        with torch.no_grad():
            got = fn(x, w, b)
            want = F.conv2d(x, w, b, 1, 1)
        return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


_AVAILABLE: dict[str, bool] = {}


def engine_available(engine: str) -> bool:
    """Whether ``"onednn"`` (prepacked weights) or ``"nnpack"`` works in this torch build; checked once."""
    if engine not in _AVAILABLE:
        if engine == "onednn":
            ok = (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                  and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
            ok = ok and _probe(lambda x, w, b: _PackedConv(w, b, (1, 1), (1, 1), (1, 1), 1, None)(x))
        elif engine == "nnpack":
            ok = bool(getattr(torch, "_nnpack_available", lambda: False)())
            ok = ok and _probe(lambda x, w, b: torch._nnpack_spatial_convolution(x, w, b, [1, 1], [1, 1]))
        else:
            raise ValueError(f"unknown engine {engine!r}")
        _AVAILABLE[engine] = ok
    return _AVAILABLE[engine]


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


class _PackedConv:
    """One conv with its weight reordered once into oneDNN's layout; NHWC in, NHWC out."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int, input_shape):
        self.args = (list(padding), list(stride), list(dilation), groups)
        hint = [list(input_shape)] if input_shape is not None else []
        # The shape hint only picks the blocked format; any input shape gives the right result (tested).
        self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().float().to_mkldnn(), *self.args[:3],
                                                                groups, *hint)
        self.bias = bias.detach().float().clone() if bias is not None else None

    def __call__(self, x: Tensor) -> Tensor:
        padding, stride, dilation, groups = self.args
        return torch.ops.mkldnn._convolution_pointwise(_channels_last(x), self.weight, self.bias, padding, stride,
                                                       dilation, groups, "none", [], "")


class _NnpackConv:
    """One dense conv through NNPACK (NCHW only); returns NHWC like the other engines."""

    def __init__(self, weight: Tensor, bias: Tensor | None, padding):
        self.weight = weight.detach().float().contiguous()
        self.bias = bias.detach().float().clone() if bias is not None else torch.zeros(self.weight.shape[0])
        self.padding = list(padding)

    def __call__(self, x: Tensor) -> Tensor:
        y = torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, self.padding, [1, 1])
        return _channels_last(y)


class _PlainConv:
    """One conv as F.conv2d on NHWC tensors (the engine where oneDNN prepacking is unavailable or the padding is a string)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int):
        self.weight = _channels_last(weight.detach().float().clone())
        self.bias = bias.detach().float().clone() if bias is not None else None
        self.args = (stride, padding, dilation, groups)

    def __call__(self, x: Tensor) -> Tensor:
        return F.conv2d(_channels_last(x), self.weight, self.bias, *self.args)


def _nnpack_applies(weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    # NNPACK's batched convolution: stride 1, no dilation, no groups, integer padding smaller than the kernel.
    if isinstance(padding, str) or groups != 1 or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return False
    return all(p < k for p, k in zip(padding, weight.shape[-2:])) and max(weight.shape[-2:]) <= 16


def nnpack_batch(input_shape) -> bool:
    """NNPACK pays off from batch 16 (PyTorch's own threshold; at batch 8 it was slower here). No hint: allowed."""
    return input_shape is None or input_shape[0] >= NNPACK_MIN_BATCH


def conv_stage(weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int = 1,
               input_shape=None, prepack: bool = True, nnpack: bool = False) -> Callable[[Tensor], Tensor]:
    """A callable that computes ``F.conv2d(x, weight, bias, ...)`` on CPU, NHWC out, on the best engine allowed.

    ``nnpack`` allows NNPACK where it applies (dense convs, stride 1, no dilation, batch >= 16 if
    ``input_shape`` is given); ``prepack`` allows prepacked oneDNN weights; else (or for string
    padding) plain F.conv2d in channels_last. ``input_shape`` (B, C, H, W) is a hint: the layout
    of prepacked weights and the batch size for NNPACK; any input shape gives the right result.
    """
    if nnpack and nnpack_batch(input_shape) and engine_available("nnpack") \
            and _nnpack_applies(weight, stride, padding, dilation, groups):
        return _NnpackConv(weight, bias, padding)
    if prepack and not isinstance(padding, str) and engine_available("onednn"):
        return _PackedConv(weight, bias, stride, padding, dilation, groups, input_shape)
    return _PlainConv(weight, bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------- paths


class FastPath:
    """A layer's chosen inference path: a chain of conv stages built from a snapshot of its parameters.

    ``kind`` names the path (e.g. "factored", "dense"); the layer's ``_fast_stages(kind, input_shape,
    prepack)`` makes the stages. The snapshot is keyed by each parameter's storage pointer and version
    counter; when any of them changes the stages are rebuilt before the next call. Copies
    (``copy.deepcopy``, pickling) carry the choice but no stages; they build their own from their own
    parameters on first use.
    """

    def __init__(self, kind: str, input_shape=None, prepack: bool = True):
        self.kind, self.input_shape, self.prepack = kind, input_shape, prepack
        self.stages: list | None = None
        self.key: tuple | None = None

    @staticmethod
    def _key(layer: nn.Module) -> tuple:
        # Inference tensors (parameters made under inference_mode) keep no version counter; their
        # storage pointer is all there is to compare.
        return tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype, p.device)
                     for p in layer.parameters())

    @staticmethod
    def applies(layer: nn.Module, x: Tensor) -> bool:
        """Whether a path may run on ``x``: 4-D CPU float32, float32 CPU weights, no autograd graph to record."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
            return False
        params = list(layer.parameters())
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return False
        return all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)

    def __call__(self, layer: nn.Module, x: Tensor) -> Tensor:
        key = self._key(layer)
        if self.stages is None or key != self.key:
            with torch.no_grad():
                self.stages = layer._fast_stages(self.kind, self.input_shape, self.prepack)
            self.key = key
        for stage in self.stages:
            x = stage(x)
        return x

    def __getstate__(self):
        return {"kind": self.kind, "input_shape": self.input_shape, "prepack": self.prepack, "stages": None, "key": None}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __deepcopy__(self, memo):
        return FastPath(self.kind, self.input_shape, self.prepack)

    def __repr__(self) -> str:
        return f"FastPath({self.kind})"


def check_path(path: str) -> None:
    if path not in PATHS:
        raise UserError(f"path {path!r} is not one of {', '.join(PATHS)}")


def cpu_device(device) -> bool:
    """Whether ``device`` (a string, torch.device, or None for the CPU) is the CPU."""
    return torch.device(device if device is not None else "cpu").type == "cpu"


def prefer_dense(dense_macs: float, factored_macs: float, scheme: str, nnpack: bool) -> bool:
    """Whether one dense conv is predicted faster than the factors on CPU (MACs / :data:`CPU_RATES`)."""
    dense_rate = CPU_RATES["dense-nnpack" if nnpack else "dense-onednn"]
    return dense_macs / dense_rate < factored_macs / CPU_RATES[scheme]


def nnpack_for(conv: nn.Conv2d | None = None, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), kernel_size=(3, 3),
               groups: int = 1) -> bool:
    """Whether a dense conv of this geometry would run on NNPACK (engine present and geometry supported)."""
    if conv is not None:
        stride, padding, dilation, kernel_size, groups = conv.stride, conv.padding, conv.dilation, conv.kernel_size, conv.groups
    fake = torch.empty(1, 1, *kernel_size)
    return _nnpack_applies(fake, stride, padding, dilation, groups) and engine_available("nnpack")


# ---------------------------------------------------------------------------------- layers


def _out_shape(conv: nn.Conv2d, shape):
    """(B, N, H', W') that ``conv`` produces from an input of ``shape``; None if unknown."""
    if shape is None or isinstance(conv.padding, str):
        return None
    b, _, h, w = shape
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((h, w), conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (b, conv.out_channels, *size)


def _stages(convs, input_shape, prepack: bool) -> list:
    """One CPU stage per conv, in order (the intermediate shapes passed on as layout hints)."""
    stages, shape = [], input_shape
    for conv in convs:
        stages.append(conv_stage(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                 conv.groups, shape, prepack))
        shape = _out_shape(conv, shape)
    return stages


class Optimisable:
    """Base class of the expansion layers: choosing an inference path once, and running it where it applies.

    A subclass is an ``nn.Module`` with the replaced conv's ``kernel_size``, ``stride``, ``padding`` and
    ``dilation``, a ``scheme`` ("v1" or "v2"), and the methods ``plain_forward(x)``, ``_factored_convs()`` (its ``nn.Conv2d``
    factors in the order they run, the last carrying the bias), ``_macs_per_position()`` and
    ``dense_weight()``. :func:`expansion_layers` finds the layers by this class.
    """

    _fast: FastPath | None = None
    # TorchScript compiles a module's properties; the path is Python-only state, never part of a scripted model.
    __jit_unused_properties__ = ["inference_path"]
    __jit_ignored_attributes__ = ["_fast"]

    def _factored_convs(self) -> list:
        raise NotImplementedError

    def plain_forward(self, x: Tensor) -> Tensor:
        """The factors run as the plain convs they are (what TorchScript and every export see)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript leaves this branch out: a path is Python-only
            fast = self._run(x)
            if fast is not None:
                return fast
        return self.plain_forward(x)

    def _macs_per_position(self) -> tuple[int, int]:
        """(dense conv, factors) MACs per output position, the intermediate counted at the stride it runs at."""
        raise NotImplementedError

    @property
    def inference_path(self) -> str:
        """The path chosen by :meth:`optimise_for`: "default", "factored" or "dense"."""
        return self._fast.kind if self._fast is not None else "default"

    def optimise_for(self, device=None, input_shape=None, path: str = "auto", prepack: bool = True):
        """Choose, once, how this layer runs inference on ``device``; returns the layer.

        Parameters
        ----------
        device : "cpu", "cuda", a torch.device, or None for the device of the layer's weights. Only the
            CPU has fast paths (see the module docstring); elsewhere the default forward is kept.
        input_shape : optional (B, C, H, W) the layer will see: a layout hint for prepacked weights, and
            the batch size that decides whether NNPACK may run a dense conv (from batch 16). Any input
            shape gives the right result.
        path : "auto" (the factors, or one dense conv where :func:`prefer_dense` predicts it
            faster), "factored" (the factors, NHWC, prepacked), "dense" (one conv with
            ``dense_weight()``), or "default" (no path: plain forward).
        prepack : allow oneDNN prepacked weights (else plain F.conv2d in channels_last).

        Every path computes the default forward's function to float32 rounding. The path is a
        snapshot rebuilt whenever the weights change; it is used only under no autograd
        (``torch.no_grad``/``inference_mode``) on CPU float32 inputs, and is not in the state_dict.
        """
        check_path(path)
        if device is None:
            device = next(self.parameters()).device
        if path == "default" or not cpu_device(device):
            self._fast = None
            return self
        if path == "auto":
            dense, factored = self._macs_per_position()
            nnpack = nnpack_for(stride=self.stride, padding=self.padding, dilation=self.dilation,
                                kernel_size=self.kernel_size) and nnpack_batch(input_shape)
            path = "dense" if prefer_dense(dense, factored, self.scheme, nnpack) else "factored"
        self._fast = FastPath(path, tuple(input_shape) if input_shape is not None else None, prepack)
        return self

    def _fast_stages(self, kind: str, input_shape, prepack: bool) -> list:
        """The CPU stages of path ``kind``, from the current weights (called by :class:`FastPath`)."""
        if kind == "dense":
            bias = self._factored_convs()[-1].bias
            return [conv_stage(self.dense_weight().float(), bias, self.stride, self.padding, self.dilation,
                               1, input_shape, prepack, nnpack=True)]
        return _stages(self._factored_convs(), input_shape, prepack)

    def _run(self, x: Tensor):
        """The chosen path's output, or None where no path applies.

        None too while the model is being captured (``torch.jit.trace``, ``torch.export``, ``torch.compile``,
        the ONNX exporter): a path's prepacked oneDNN weights and private ops are this process's, not a
        graph's, so a captured model holds the factors as the plain convs they are.
        """
        fast = self._fast
        if fast is None or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        if fast.applies(self, x):
            return fast(self, x)
        return None

    def _path_repr(self) -> str:
        return f", path={self.inference_path}" if self._fast is not None else ""


# ---------------------------------------------------------------------------------- whole models


def expansion_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every lrx expansion layer (an :class:`Optimisable`) in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Optimisable)]


class InferenceModel(nn.Module):
    """``model`` run as a served model runs: inputs moved to its device (and to channels_last), a dtype, a
    CUDA graph per input shape, ``torch.compile``; the output is float32. Made by :func:`optimise`.

    Parameters
    ----------
    dtype : "float32", "bfloat16" or "float16".
    autocast : run a lower dtype under ``torch.autocast`` (weights stay float32); False casts the
        weights and inputs to ``dtype`` instead.
    cuda_graph : on CUDA, capture one graph per input shape on the first inference call with it, then
        replay it (inputs copied into the captured input); calls that want gradients run eagerly.
    compile : False, True (``torch.compile`` with its default backend) or a backend's name.
    """

    def __init__(self, model: nn.Module, device, dtype: str = "float32", autocast: bool = True,
                 channels_last: bool = True, cuda_graph: bool = False, compile: bool | str = False):
        super().__init__()
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", key="profile.dtype")
        self.device = torch.device(device)
        if cuda_graph and self.device.type != "cuda":
            raise UserError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.model = model
        self._settings = dict(dtype=dtype, autocast=autocast, channels_last=channels_last, cuda_graph=cuda_graph,
                              compile=compile)
        self.dtype = DTYPES[dtype]
        self.autocast = autocast and self.dtype != torch.float32
        if not autocast and self.dtype != torch.float32:
            model.to(self.dtype)
        self.channels_last, self.cuda_graph = channels_last, cuda_graph
        runner = model
        if compile:
            runner = torch.compile(model) if compile is True else torch.compile(model, backend=compile)
        self._runner = [runner]  # in a list: a compiled wrapper is not a submodule (no second state_dict)
        self._graphs: dict[tuple, tuple] = {}

    def _eager(self, x: Tensor) -> Tensor:
        context = (torch.autocast(self.device.type, dtype=self.dtype) if self.autocast
                   else contextlib.nullcontext())
        with context:
            return self._runner[0](x)

    def _graphed(self, x: Tensor) -> Tensor:
        shape = (tuple(x.shape), x.dtype)
        with torch.inference_mode():  # static tensors and their updates in one mode (inference tensors)
            if shape not in self._graphs:
                static = x.clone()
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
                    for _ in range(3):
                        self._eager(static)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = self._eager(static)
                self._graphs[shape] = (graph, static, out)
            graph, static, out = self._graphs[shape]
            static.copy_(x)
            graph.replay()
            return out.clone()

    def forward(self, x: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return self._forward(x)
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            return self._forward(x)
        finally:
            torch.backends.cudnn.benchmark = before

    def _forward(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        if self.channels_last and x.dim() == 4:
            x = _channels_last(x)
        if not self.autocast and self.dtype != torch.float32:
            x = x.to(self.dtype)
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if self.cuda_graph and not wants_grad:
            y = self._graphed(x)
        else:
            y = self._eager(x)
        return y.float()

    def __deepcopy__(self, memo):
        # A copy carries the choice, not the compiled code or captured graphs: it compiles and captures its own.
        return InferenceModel(copy.deepcopy(self.model, memo), self.device, **self._settings)

    def extra_repr(self) -> str:
        return (f"dtype={str(self.dtype).split('.')[-1]}, autocast={self.autocast}, channels_last={self.channels_last}, "
                f"cuda_graph={self.cuda_graph}, compiled={self._runner[0] is not self.model}")


@torch.no_grad()
def optimise(model: nn.Module, device=None, example_input: Tensor | None = None, channels_last: bool = True,
             path: str = "auto", prepack: bool = True, dtype: str = "float32", autocast: bool = True,
             cuda_graph: bool = False, compile: bool | str = False) -> nn.Module:
    """Choose, once, how ``model`` runs inference on ``device``: the path of every expansion layer (in
    place), and on CUDA or with a lower dtype or ``compile``, an :class:`InferenceModel` around it.

    Returns ``model`` itself on the CPU in float32 without compiling (the usual CPU case), else the
    wrapper (whose ``.model`` is ``model``).

    Parameters
    ----------
    device : where the model will run (default: where its first parameter is). Only CPU has fast paths.
    example_input : optional (B, C, H, W) batch; one forward with it records each layer's input shape,
        a layout hint for the prepacked weights. Paths work for any input shape either way.
    channels_last : on CPU, also put the model's other 4-D parameters in channels_last, so that the
        convs before the first expansion layer (and everything after) run NHWC as the layers do. Values
        are unchanged; it is a layout change of the parameters in place.
    path, prepack : passed to each layer's ``optimise_for`` ("auto" picks per layer; see the layers).
    dtype, autocast, cuda_graph, compile : see :class:`InferenceModel`. On CUDA, channels_last puts the
        parameters (and the wrapper's inputs) in channels_last, and the wrapper runs with
        ``torch.backends.cudnn.benchmark`` on (cuDNN times its algorithms once per new shape; the
        process-wide flag is restored after each call).
    """
    check_path(path)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    device = torch.device(device)
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", key="profile.dtype")
    layers = expansion_layers(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    shapes: dict[str, tuple] = {}
    if example_input is not None and layers:
        def recorder(name):
            def hook(module, args):
                shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is left as it is
            return hook

        hooks = [m.register_forward_pre_hook(recorder(name)) for name, m in layers]
        try:
            model(example_input)
        finally:
            for h in hooks:
                h.remove()
    for name, layer in layers:
        layer.optimise_for(device, input_shape=shapes.get(name), path=path, prepack=prepack)
    if device.type == "cuda" or dtype != "float32" or cuda_graph or compile:
        return InferenceModel(model, device, dtype, autocast, channels_last, cuda_graph, compile)
    return model


def describe(model: nn.Module) -> dict[str, str]:
    """``{layer name: chosen path}`` for every expansion layer ("default" where none was chosen)."""
    return {name: layer.inference_path for name, layer in expansion_layers(model)}
