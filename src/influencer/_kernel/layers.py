"""Layers modelled one by one (K-FAC, EK-FAC, layer-wise scores, Kronecker projections).

:func:`find_layers` maps the chosen parameters to the supported layers holding them (``nn.Linear``,
``nn.Conv2d``, transformers' ``Conv1D``), each as one ``(d_out, d_in)`` matrix ``[W | b]`` in flat
theta; :class:`LayerCapture` hooks their modules to record input (activation) rows and output-gradient
rows while the model runs; :func:`check_layer_model` verifies that the rows rebuild autograd's
gradient, i.e. that the parameters reach the loss only through their layer's forward.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influencer._kernel.errors import ConfigError
from influencer._kernel.functional import ModelFunction

# ---- layers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """One supported layer (see :func:`is_supported`) whose weight and/or bias are chosen.

    ``index`` ``(d_out * d_in,)``: positions in flat theta such that ``theta[index].view(d_out,
    d_in)`` is ``[W | b]`` (weight flattened to ``(d_out, fan_in)``, then the bias column).
    """

    name: str
    module: nn.Module
    index: Tensor
    d_out: int
    d_in: int
    weight: bool  # the weight is chosen (else only the bias column is modelled)
    bias: bool

    def inputs(self, x: Tensor, batch: int) -> Tensor:
        """Layer input -> activation rows ``(B, T, d_in)`` (patches for a convolution)."""
        m = self.module
        if x.ndim < 2 or x.shape[0] != batch:
            raise ConfigError(
                f"layer {self.name!r} got an input of shape {tuple(x.shape)} for a batch of {batch} "
                "examples; K-FAC needs the batch dimension first in every chosen layer's input"
            )
        if isinstance(m, nn.Conv2d):
            if x.ndim != 4:
                raise ConfigError(f"conv layer {self.name!r} needs (B, C, H, W) inputs, got {tuple(x.shape)}")
            rows = F.unfold(self.padded(x), m.kernel_size, dilation=m.dilation, stride=m.stride).transpose(
                1, 2
            )
        else:
            rows = x.reshape(batch, -1, x.shape[-1])
        rows = rows.detach()
        if not self.weight:
            rows = rows[..., :0]
        if self.bias:
            return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        # A copy, so that the model editing its input in place later cannot change what was seen.
        return rows if isinstance(m, nn.Conv2d) else rows.clone()

    def padded(self, x: Tensor) -> Tensor:
        """A convolution's input ``(B, C, H, W)`` with the layer's padding applied, in its mode."""
        m = self.module
        pad = m._reversed_padding_repeated_twice  # covers 'same' (possibly asymmetric) and ints
        if not any(pad):
            return x
        return F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)

    def output_grads(self, g: Tensor, batch: int) -> Tensor:
        """Gradient w.r.t. the layer output -> rows ``(B, T, d_out)`` matching :meth:`inputs`."""
        g = g.detach() if g.requires_grad else g  # (a gradient of a create_graph backward pass)
        if isinstance(self.module, nn.Conv2d):
            return g.flatten(2).transpose(1, 2)
        return g.reshape(batch, -1, g.shape[-1])


def is_conv1d(module: nn.Module) -> bool:
    """Transformers' ``Conv1D`` (GPT-2): a dense layer ``x @ W + b`` with ``W`` ``(d_in, d_out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.ndim == 2


def is_supported(module: nn.Module) -> bool:
    """Whether K-FAC models this module: ``nn.Linear``, ``nn.Conv2d`` or transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d(module)


def _owners(model: nn.Module) -> dict[int, dict[int, str]]:
    """Parameter id -> {id of a module holding it: a name it has there} (tied weights have several)."""
    owners: dict[int, dict[int, str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(module), f"{mname}.{pname}" if mname else pname)
    return owners


def supported_parameters(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Trainable parameters K-FAC can model, and the other trainable ones with the reason.

    Supported: the weight and bias of each :func:`is_supported` layer (``Conv2d`` with
    ``groups=1``) that no other module shares. Frozen parameters are neither chosen nor reported.
    """
    modules = dict(model.named_modules())
    owners = _owners(model)
    chosen, skipped = [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        if module is None or not is_supported(module) or attr not in ("weight", "bias"):
            kind = type(module).__name__ if module is not None else "model"
            skipped[name] = kind
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            skipped[name] = f"Conv2d with groups={module.groups}"
        elif len(owners[id(p)]) > 1:
            skipped[name] = "shared by several modules"
        else:
            chosen.append(name)
    return chosen, skipped


def find_layers(fn: ModelFunction) -> list[Layer]:
    """The supported layers covering every chosen parameter, or a :class:`ConfigError`."""
    modules = dict(fn.model.named_modules())
    offsets = dict(zip(fn.names, itertools.accumulate([0, *fn.numels]), strict=False))
    chosen: dict[str, dict[str, str]] = {}
    bad = []
    for name in fn.names:
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        if module is not None and is_supported(module) and attr in ("weight", "bias"):
            chosen.setdefault(path, {})[attr] = name
        else:
            bad.append(name)
    if bad:
        ok = [n for n, m in modules.items() if is_supported(m)]
        raise ConfigError(
            f"K-FAC/EK-FAC model only nn.Linear, nn.Conv2d and transformers Conv1D layers (weight and "
            f"bias); these chosen parameters are not in one: {', '.join(bad)}. Pass params='supported' "
            "(every supported layer, the rest left out with a warning) or choose params=[...] covering "
            f"those layers only (this model has: {', '.join(repr(n) for n in ok) or 'none'}), or use CG, "
            "LiSSA or Arnoldi for the other parameters"
        )
    owners = _owners(fn.model)
    named = dict(fn.model.named_parameters())
    layers = []
    for path, parts in chosen.items():
        module = modules[path]
        for n in parts.values():
            holders = owners[id(named[n])]
            if len(holders) > 1:
                raise ConfigError(
                    f"parameter {n!r} is shared by several modules ({', '.join(holders.values())}); K-FAC "
                    "models each parameter as one layer's: leave it out of params=[...] or use CG/Arnoldi"
                )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ConfigError(f"conv layer {path!r} has groups={module.groups}; K-FAC supports groups=1 only")
        conv1d = is_conv1d(module)
        d_out = module.weight.shape[1] if conv1d else module.weight.shape[0]
        fan_in = module.weight.shape[0] if conv1d else math.prod(module.weight.shape[1:])
        cols = []
        if "weight" in parts:
            w0 = offsets[parts["weight"]]
            if conv1d:  # W is stored (d_in, d_out): row-major [W^T] reads it with a transposed index
                cols.append(w0 + torch.arange(d_out)[:, None] + torch.arange(fan_in) * d_out)
            else:
                cols.append(w0 + torch.arange(d_out)[:, None] * fan_in + torch.arange(fan_in))
        if "bias" in parts:
            cols.append(offsets[parts["bias"]] + torch.arange(d_out)[:, None])
        index = torch.cat(cols, dim=1)  # (d_out, d_in)
        layers.append(
            Layer(
                path or "<model>",
                module,
                index.reshape(-1).to(fn.device),
                d_out,
                index.shape[1],
                "weight" in parts,
                "bias" in parts,
            )
        )
    return layers


# ---- capture -----------------------------------------------------------------------------------


class LayerCapture:
    """Hooks on the layers' modules: activation rows per call; output-gradient rows per backward."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self.batch = 0
        self.acts: list[list[Tensor]] = []
        self.grads: list[dict[int, Tensor]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.module.register_forward_hook(self.forward_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def start(self, batch: int) -> None:
        self.batch = batch
        self.acts = [[] for _ in self.layers]

    def forward_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            layer, k = self.layers[i], len(self.acts[i])
            self.acts[i].append(layer.inputs(inputs[0], self.batch))
            if not output.requires_grad:
                raise ConfigError(f"layer {layer.name!r} ran without autograd (torch.no_grad in the task?)")
            # A tensor hook registered now sees the gradient of this output even if the model later
            # modifies it in place (e.g. ReLU(inplace=True)).
            output.register_hook(lambda g: self.grads[i].__setitem__(k, layer.output_grads(g, self.batch)))

        return hook

    def gradient_rows(self) -> list[list[Tensor]]:
        """Per layer, per call: output-gradient rows ``(B, T, d_out)`` (zero if it had none)."""
        out = []
        for i, layer in enumerate(self.layers):
            calls = []
            for k, a in enumerate(self.acts[i]):
                g = self.grads[i].get(k)
                calls.append(g if g is not None else a.new_zeros(*a.shape[:2], layer.d_out))
            out.append(calls)
        return out


class ProbeCapture(LayerCapture):
    """:class:`LayerCapture` that adds a zero leaf (a probe) to each layer call's output.

    The gradient with respect to a probe is the gradient with respect to that output, so a
    backward pass asks autograd for the probes only and never computes the weights' gradients.
    """

    def start(self, batch: int) -> None:
        super().start(batch)
        self.probes: list[list[Tensor]] = [[] for _ in self.layers]

    def forward_hook(self, i: int):  # type: ignore[override]
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
            layer = self.layers[i]
            self.acts[i].append(layer.inputs(inputs[0], self.batch))
            if not output.requires_grad:
                raise ConfigError(f"layer {layer.name!r} ran without autograd (torch.no_grad in the task?)")
            probe = torch.zeros_like(output, requires_grad=True)
            self.probes[i].append(probe)
            # A new tensor: the model editing it in place later (e.g. ReLU(inplace=True)) cannot
            # change the gradient that reaches the probe.
            return output + probe

        return hook

    def backward(
        self, out: Tensor, cotangent: Tensor, theta: Tensor | None, retain: bool
    ) -> tuple[list[list[Tensor]], Tensor | None]:
        """Output-gradient rows per layer and call (as :meth:`gradient_rows`) for one direction,
        and the parameters' gradient when ``theta`` is given (for :func:`check_layer_model`)."""
        probes = [probe for calls in self.probes for probe in calls]
        inputs = probes if theta is None else [*probes, theta]
        grads = torch.autograd.grad(out, inputs, cotangent, retain_graph=retain, allow_unused=True)
        rows, k = [], 0
        for i, layer in enumerate(self.layers):
            calls = []
            for a in self.acts[i]:
                g = grads[k]
                k += 1
                calls.append(
                    layer.output_grads(g, self.batch)
                    if g is not None
                    else a.new_zeros(*a.shape[:2], layer.d_out)
                )
            rows.append(calls)
        return rows, (grads[-1] if theta is not None else None)


def check_layer_model(layers: list[Layer], acts: list[list[Tensor]], grads: list[list[Tensor]], g: Tensor):
    """Raise unless ``sum_{i,t} g a^T`` per layer equals autograd's gradient of those parameters.

    It fails when a layer's weights are also used outside its forward (tied or functional use),
    or when its input is not batch-first: cases the layer model cannot represent.
    """
    for layer, a_calls, g_calls in zip(layers, acts, grads, strict=True):
        rebuilt = sum(torch.einsum("bto,bti->oi", gr, a) for gr, a in zip(g_calls, a_calls, strict=True))
        true = g[layer.index].view(layer.d_out, layer.d_in)
        tol = max(1000 * torch.finfo(g.dtype).eps, 1e-9) * (float(true.norm()) + 1e-30)
        if float((rebuilt - true).norm()) > tol:
            raise ConfigError(
                f"layer {layer.name!r}: gradients rebuilt from its inputs and output gradients do not "
                "match autograd's (relative error "
                f"{float((rebuilt - true).norm()) / (float(true.norm()) + 1e-30):.2g}). Its parameters are "
                "probably used outside the module's forward (weight tying, F.linear on module.weight) "
                "or its input is not batch-first; leave it out of params=[...] or use CG/Arnoldi"
            )
