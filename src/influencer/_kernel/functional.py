"""A model and its task as pure functions of one flat parameter vector theta ``(p,)``.

Everything differentiable in the library goes through :class:`ModelFunction`:

* per-example gradients: ``vmap(grad(.))`` over a batch -> ``(B, p)``;
* Hessian-vector products of the loss per batch (the regulariser's once per product), on blocks
  of ``(k, p)`` vectors, in one of two modes (:data:`HVPMode`):

  - ``"reverse"`` (default): reverse-over-reverse. The batch's gradient is computed once with its
    autograd graph kept (:meth:`ModelFunction.linearize`); each block of products is then one
    batched backward pass through that graph. The graph can be kept and reused for many products
    on the same batch (see :class:`~influencer._kernel.curvature.Curvature`), and its size is
    measured while it is built so callers can decide whether to keep it.
  - ``"forward"``: forward-over-reverse, ``jvp(grad(.))`` vmapped over the vectors; nothing is
    kept between products. For models whose operations lack double-backward formulas.

* Gauss-Newton-vector products: ``J^T H_out J v``, by the same two routes (reverse mode gets ``J v``
  from the double-backward trick: ``J v = d/du <J^T u, v>``).

Working on a flat theta keeps every estimator a plain linear-algebra routine on ``(k, p)`` tensors.
Only the chosen parameters are in theta; the rest of the module's parameters and buffers are held
fixed. The module itself is never mutated: its state is passed to ``functional_call``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from influencer._kernel.data import batch_size_of, to_device
from influencer._kernel.errors import ConfigError, InfluencerError, TaskError
from influencer._kernel.modes import evaluating
from influencer._kernel.task import Batch, Task

HVPMode = Literal["reverse", "forward"]
HVP_MODES: tuple[HVPMode, ...] = ("reverse", "forward")


def check_hvp_mode(mode: str) -> None:
    if mode not in HVP_MODES:
        raise ConfigError(f"hvp must be one of {HVP_MODES}, got {mode!r}")


class _Bound(nn.Module):
    """Runs ``fn(model, *args)`` so that ``functional_call`` can swap the model's state.

    The model runs in eval mode (influence is defined for the deterministic model); the user's
    train/eval mode is restored after each call.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        with evaluating(self.model):
            return fn(self.model, *args)


def select_parameters(model: nn.Module, params: Sequence[str] | str | None) -> list[str]:
    """Names of the parameters influence is computed over.

    ``None``: every parameter with ``requires_grad``. Otherwise each entry is a parameter name
    (``"fc.weight"``) or a module prefix (``"fc"`` selects ``fc.weight`` and ``fc.bias``); named
    parameters are used whether or not they require grad (e.g. frozen base weights of an adapter).
    """
    named = dict(model.named_parameters())
    if not named:
        raise TaskError("the model has no parameters")
    if params is not None and not isinstance(params, str) and len(list(params)) == 0:
        raise ConfigError(
            "params is empty, so there is nothing to compute influence over: name parameters or modules "
            "(e.g. params=['fc']), or pass params=None for every trainable parameter"
        )
    if params == "supported" and "supported" not in dict(model.named_modules()):
        raise TaskError(
            "params='supported' depends on the estimator: pass it to Influence(..., params='supported'), "
            "or list the names with estimator.supported_parameters(model)"
        )
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise TaskError(
                "the model has no trainable parameters (none requires grad): set requires_grad on the "
                "ones to explain with, or name them with params=[...] (--params on the command line)"
            )
        return names
    wanted = [params] if isinstance(params, str) else list(params)
    names = []
    for w in wanted:
        hits = [n for n in named if n == w or n.startswith(w + ".")]
        if not hits:
            raise TaskError(f"no parameter or module named {w!r}; the model has: {', '.join(named)}")
        names.extend(h for h in hits if h not in names)
    return names


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a :class:`torch.device` that this process can use; :class:`ConfigError` otherwise."""
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device {device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None
    if out.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"device {device!r} is not available ({why}); use device='cpu'")
    if out.type == "cuda" and out.index is not None and out.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    if out.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} is not available (no Apple GPU); use device='cpu'")
    return out


def check_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` if it is a floating torch dtype (gradients need one); :class:`ConfigError` otherwise."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"dtype must be a floating torch dtype (torch.float32 or torch.float64; gradients need one), "
            f"got {dtype!r}"
        )
    return dtype


_VMAP_FAILURE = "vmap: It looks like you're either (1) calling .item()"


def untraceable(exc: BaseException) -> TaskError | None:
    """A one-line :class:`TaskError` for a model that torch.func cannot differentiate as influence
    needs (a forward ``vmap`` cannot trace; a ``torch.compile``'d module without double backward),
    else None."""
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    if "double backward" in text and "compile" in text:
        return TaskError(
            "the model is torch.compile'd, and compiled graphs do not support the double backward "
            "(second derivatives) influence needs: pass the uncompiled module (module._orig_mod, or "
            "the model before torch.compile)"
        )
    if _VMAP_FAILURE not in text:
        return None
    return TaskError(
        "the model's forward (or the task) calls .item(), or branches on a tensor's value (if x > 0), "
        "which torch.func.vmap cannot trace for per-example gradients: remove .item() and keep values "
        "as tensors (torch.where instead of if), or set vectorize = False on the task (per-example "
        "gradients one example at a time, slower)"
    )


@contextlib.contextmanager
def traceable() -> Any:
    """Turn torch.func's failure on a model it cannot differentiate (see :func:`untraceable`) into
    a one-line :class:`TaskError`; other errors pass through."""
    try:
        yield
    except RuntimeError as exc:
        clear = untraceable(exc)
        if clear is None:
            raise
        raise clear from exc


class ModelFunction:
    """``model`` + ``task`` as functions of flat parameters ``theta`` of length ``p``."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        params: Sequence[str] | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # The model is run in eval mode on every call (see _Bound); its own mode is left alone.
        self.model = model
        self.task = task
        self.bound = _Bound(model)
        self.names = select_parameters(model, params)
        named = dict(model.named_parameters())
        first = named[self.names[0]]
        self.device = check_device(device) if device is not None else first.device
        self.dtype = check_dtype(dtype) if dtype is not None else first.dtype

        def place(t: Tensor) -> Tensor:
            t = t.detach().to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t

        # The full state (params + buffers) is passed to functional_call, so the module's own
        # tensors are never read and the module can stay where it is.
        self.fixed = {
            "model." + n: place(t) for n, t in [*named.items(), *model.named_buffers()] if n not in self.names
        }
        self.fixed_param_keys = ["model." + n for n in named if n not in self.names]
        self.shapes = [tuple(named[n].shape) for n in self.names]
        self.numels = [math.prod(s) for s in self.shapes]
        self.theta0 = torch.cat([place(named[n]).reshape(-1) for n in self.names])
        self.p = int(self.theta0.numel())
        # A batch of curvature products through a convolution's second derivatives has no batched
        # kernel: vmap runs them one vector at a time anyway, with its own overhead on top, so a
        # plain loop of backward passes is faster there (SmallCNN, 256 examples, 64 vectors:
        # 1.4-1.5 s against 1.8-2.5 s batched); elsewhere the batched pass is (tanh MLP: 1.5x).
        self.loops_over_vectors = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())

    # ---- parameters ---------------------------------------------------------------------------

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Flat ``(p,)`` -> ``{name: tensor}`` for the chosen parameters."""
        parts = torch.split(theta, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def state(self, theta: Tensor) -> dict[str, Tensor]:
        return {**self.fixed, **{"model." + n: t for n, t in self.unflatten(theta).items()}}

    def param_dict(self, theta: Tensor) -> dict[str, Tensor]:
        """All model parameters (chosen ones from ``theta``) as the regulariser sees them."""
        fixed = {k[len("model.") :]: self.fixed[k] for k in self.fixed_param_keys}
        return {**fixed, **self.unflatten(theta)}

    def load_into(self, theta: Tensor) -> None:
        """Copy ``theta`` into the module's parameters (e.g. after an influence update)."""
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in self.unflatten(theta).items():
                named[n].copy_(t.to(named[n].device, named[n].dtype))

    def freeze(self) -> None:
        """Read the buffers and unchosen parameters from copies of their values now, no longer from
        the module's own tensors (which a training loop goes on changing in place)."""
        self.fixed = {k: v.clone() for k, v in self.fixed.items()}

    def cast(self, dtype: torch.dtype) -> ModelFunction:
        """A copy that computes in ``dtype`` (e.g. float64 for exact references)."""
        other = object.__new__(ModelFunction)
        other.__dict__.update(self.__dict__)
        other.dtype = dtype
        other.fixed = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.fixed.items()}
        other.theta0 = self.theta0.to(dtype)
        return other

    def prepare(self, batch: Batch) -> Batch:
        """Move a batch to this function's device and floating dtype."""
        return to_device(batch, self.device, self.dtype)

    # ---- scalar functions of theta --------------------------------------------------------------

    def _call(self, method: Callable[..., Any], theta: Tensor, *args: Any) -> Any:
        return functional_call(self.bound, self.state(theta), (method, *args))

    def loss(self, theta: Tensor, batch: Batch) -> Tensor:
        """Per-example training loss ``(B,)``."""
        return self._call(self.task.loss, theta, batch)

    def measurement(self, theta: Tensor, batch: Batch) -> Tensor:
        """Per-example test measurement ``(B,)``."""
        return self._call(self.task.measurement, theta, batch)

    def outputs(self, theta: Tensor, batch: Batch) -> Tensor:
        return self._call(self.task.outputs, theta, batch)

    def regularizer(self, theta: Tensor) -> Tensor:
        r = self.task.regularizer(self.param_dict(theta))
        return torch.as_tensor(r, dtype=theta.dtype, device=theta.device)

    def objective(self, theta: Tensor, batch: Batch, weight: float, weights: Tensor | None = None) -> Tensor:
        """``weight * sum_i w_i (loss_i + Omega)`` over the batch; with weight 1/n, batches sum to J.

        ``weights`` ``(B,)``: the data weights ``w_i`` (default all ones, computed without them).
        """
        losses = self.loss(theta, batch)
        if weights is None:
            return weight * (losses.sum() + losses.shape[0] * self.regularizer(theta))
        return weight * ((weights * losses).sum() + weights.sum() * self.regularizer(theta))

    def check(self, batch: Batch, theta: Tensor | None = None, what: str = "training") -> None:
        """Validate the task's outputs on a real batch; raise :class:`TaskError` naming the fix.

        ``batch`` holds the first examples of the ``what`` data (named in messages).
        """
        b = batch_size_of(batch)
        theta = self.theta0 if theta is None else theta
        self.task.check_batch(batch)
        with torch.no_grad():
            checks_outputs = type(self.task).check_outputs is not Task.check_outputs
            if checks_outputs or self.task.supports_gauss_newton:
                outputs = self._first_call(self.outputs, theta, batch, what)
                if not isinstance(outputs, Tensor):
                    raise TaskError(
                        f"the model returned a {type(outputs).__name__}, not a tensor: "
                        f"{type(self.task).__name__} needs one tensor of outputs (B, ...); return only it "
                        "from forward, or override Task.outputs(model, batch) to pick it (e.g. model(x)[0])"
                    )
                if checks_outputs:
                    self.task.check_outputs(outputs, batch)
            for name, fn in (("loss", self.loss), ("measurement", self.measurement)):
                out = self._first_call(fn, theta, batch, what)
                if not isinstance(out, Tensor):
                    raise TaskError(f"Task.{name} must return a tensor, got {type(out).__name__}")
                if out.shape != (b,):
                    hint = (
                        " It looks reduced: compute it with reduction='none'."
                        if out.ndim == 0
                        else " Sum or average any per-output dimensions so each example has one value."
                    )
                    raise TaskError(
                        f"Task.{name} must return one value per example, shape ({b},), for a batch of "
                        f"{b}; got shape {tuple(out.shape)}.{hint}"
                    )
                if not out.is_floating_point():
                    raise TaskError(f"Task.{name} must return floating values, got {out.dtype}")
                if not torch.isfinite(out).all():
                    raise TaskError(
                        f"Task.{name} is not finite for some examples of the first batch "
                        "(NaN or inf): check the inputs and the model's weights"
                    )
            reg = self.regularizer(theta)
            if reg.ndim != 0 or not torch.isfinite(reg):
                raise TaskError(f"Task.regularizer must return a finite scalar, got {reg}")

    def explain_failure(self, theta: Tensor, batch: Batch, ids: Tensor | None) -> None:
        """After the model or task failed on ``batch``: raise the task's own one-line error naming the
        examples at fault by ``ids`` (e.g. a label out of range) when its checks find one; else return
        (the caller re-raises the failure). One forward pass, only on failure."""
        self.task.check_batch(batch, ids)
        if type(self.task).check_outputs is Task.check_outputs:
            return
        with torch.no_grad():
            try:
                outputs = self.outputs(theta, batch)
            except Exception:  # the task's checks cannot run: leave the original error to the caller
                return
        if isinstance(outputs, Tensor):
            self.task.check_outputs(outputs, batch, ids)

    @contextlib.contextmanager
    def failures_explained(self, theta: Tensor, batch: Batch, ids: Tensor | None) -> Any:
        """Run a computation on ``batch``; if the model or task fails on it (an IndexError for a label
        beyond the classes, ...), raise the error :meth:`explain_failure` finds instead."""
        try:
            yield
        except (RuntimeError, IndexError, ValueError) as exc:
            if isinstance(exc, InfluencerError):
                raise
            self.explain_failure(theta, batch, ids)
            raise

    def _first_call(self, fn: Callable[[Tensor, Batch], Any], theta: Tensor, batch: Batch, what: str) -> Any:
        """``fn(theta, batch)``; an exception from the model or task on the first examples becomes a
        :class:`TaskError` that says so (the original stays chained as its cause)."""
        try:
            return fn(theta, batch)
        except TaskError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TaskError(
                f"the model or task fails on the first {what} examples ({type(exc).__name__}: {first}); "
                "check that the data has the layout and shapes the model expects"
            ) from exc

    # ---- derivatives ---------------------------------------------------------------------------

    def _per_example(self, fn: Callable[[Tensor, Batch], Tensor], theta: Tensor, batch: Batch) -> Tensor:
        def single(t: Tensor, example: Batch) -> Tensor:
            one = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, example)
            return fn(t, one).sum()

        if getattr(self.task, "vectorize", True):
            with traceable():
                return vmap(grad(single), in_dims=(None, 0))(theta, batch)
        # The task's fallback for models whose forward cannot run under vmap (data-dependent
        # Python control flow): the same per-example gradients, one example at a time.
        g = grad(single)
        rows = [
            g(theta, tree_map(lambda x, i=i: x[i] if isinstance(x, Tensor) else x, batch))
            for i in range(batch_size_of(batch))
        ]
        return torch.stack(rows)

    def loss_grads(self, theta: Tensor, batch: Batch) -> Tensor:
        """Per-example gradients of ``loss_i + Omega`` (the i-th term of the objective), ``(B, p)``."""
        return self.example_loss_grads(theta, batch).add_(self.regularizer_grad(theta))

    def example_loss_grads(self, theta: Tensor, batch: Batch) -> Tensor:
        """Per-example gradients of ``loss_i`` alone, without the regulariser, ``(B, p)``.

        For products with many rows, ``s . (g_i + grad Omega) = s . g_i + s . grad Omega`` adds the
        regulariser once per product instead of once per row (see ``Influence``).
        """
        return self._per_example(self.loss, theta, batch)

    def regularizer_grad(self, theta: Tensor) -> Tensor:
        """``grad Omega(theta)``, ``(p,)``.

        An L2 penalty ``c/2 ||theta||^2`` (the task's :meth:`~influencer.Task.regularizer_curvature`
        is ``c``) has ``c * theta``, written out: for the built-in one the same bits as its autograd
        pass (``2 (wd / 2) theta`` scales by powers of two), without one, which a gradient store
        collected during training pays at every checkpoint.
        """
        constant = self.task.regularizer_curvature()
        if constant is not None:
            return theta * constant
        return grad(self.regularizer)(theta)

    def measurement_grads(self, theta: Tensor, batch: Batch) -> Tensor:
        """Per-example gradients of the test measurement, ``(B, p)`` (no regulariser)."""
        return self._per_example(self.measurement, theta, batch)

    def hvp(
        self, theta: Tensor, batch: Batch, vectors: Tensor, weight: float, mode: HVPMode = "reverse"
    ) -> Tensor:
        """``(weight * Hessian of sum_i loss_i) @ v`` for each row v of ``(k, p)``.

        The regulariser is left out: it is added once per product (:meth:`regularizer_hvp`),
        not once per batch, which halves the cost of a product on small batches.
        """
        if mode == "reverse":
            return self.linearize(theta, batch, weight)(vectors)
        check_hvp_mode(mode)
        g = grad(lambda t: weight * self.loss(t, batch).sum())

        def one(v: Tensor) -> Tensor:
            return jvp(g, (theta,), (v,))[1]

        return vmap(one)(vectors)

    def linearize(
        self,
        theta: Tensor,
        batch: Batch,
        weight: float,
        kind: str = "hessian",
        measure: bool = False,
    ) -> Linearized:
        """The curvature of one batch (``"hessian"`` or ``"gauss_newton"``, without the regulariser)
        as a reusable linear map ``(k, p) -> (k, p)``.

        The batch's gradient (for Gauss-Newton: its outputs and ``J^T u``) is computed once with
        its autograd graph kept; each application is one batched backward pass through it, about
        twice as fast as a forward-over-reverse product and without repeating the forward pass.
        ``measure=True`` records the bytes the kept graph holds (``Linearized.nbytes``).
        """
        leaf = theta.detach().requires_grad_(True)
        saved: dict[int, int] = {}
        if measure:
            # Tensors that live anyway (parameters, the batch) cost nothing extra to keep.
            held = {_storage_key(x) for x in tree_flatten(batch)[0] if isinstance(x, Tensor)}
            held |= {_storage_key(leaf), *(_storage_key(x) for x in self.fixed.values())}

            def pack(t: Tensor) -> Tensor:
                key = _storage_key(t)
                if key not in held:
                    saved[key] = t.untyped_storage().nbytes()
                return t.detach()  # a detached view: no reference cycle (autograd restores grad_fn)

            hooks: Any = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
        else:
            hooks = contextlib.nullcontext()
        with torch.enable_grad(), hooks:
            if kind == "hessian":
                apply = self._hessian_map(leaf, batch, weight)
            elif kind == "gauss_newton":
                apply = self._gauss_newton_map(leaf, batch, weight)
            else:
                raise ConfigError(f"curvature must be 'hessian' or 'gauss_newton', got {kind!r}")
        return Linearized(apply, sum(saved.values()) + leaf.nelement() * leaf.element_size())

    def _hessian_map(self, leaf: Tensor, batch: Batch, weight: float) -> Callable[[Tensor], Tensor]:
        (g,) = torch.autograd.grad(weight * self.loss(leaf, batch).sum(), leaf, create_graph=True)
        if g.grad_fn is None:  # the loss is linear in theta: no curvature
            return torch.zeros_like
        loop = self.loops_over_vectors
        return lambda v: _pull(g, leaf, v, loop)

    def _gauss_newton_map(self, leaf: Tensor, batch: Batch, weight: float) -> Callable[[Tensor], Tensor]:
        self._require_gauss_newton()
        out = self.outputs(leaf, batch)
        # J^T u is linear in a dummy cotangent u; differentiating it in u gives J v (reverse only).
        u = torch.zeros_like(out, requires_grad=True)
        (jt_u,) = torch.autograd.grad(out, leaf, u, create_graph=True, materialize_grads=True)
        o = out.detach().requires_grad_(True)
        (go,) = torch.autograd.grad(weight * self.task.output_loss(o, batch).sum(), o, create_graph=True)
        if jt_u.grad_fn is None or go.grad_fn is None:  # outputs constant in theta, or a linear loss
            return torch.zeros_like
        loop = self.loops_over_vectors

        def apply(v: Tensor) -> Tensor:
            jv = _pull(jt_u, u, v, loop)  # (k, *outputs.shape)
            return _pull(out, leaf, _pull(go, o, jv, loop), loop)

        return apply

    def regularizer_hvp(self, theta: Tensor, vectors: Tensor, out: Tensor | None = None) -> Tensor:
        """``Hessian of Omega @ v`` for each row of ``(k, p)`` (``weight_decay * v`` for L2); with
        ``out`` ``(k, p)``, added to it in place and returned (for L2: one pass, no temporary)."""
        constant = self.task.regularizer_curvature()
        if constant is not None:
            if out is None:
                return constant * vectors
            return out.add_(vectors, alpha=constant) if constant else out
        g = grad(self.regularizer)

        def one(v: Tensor) -> Tensor:
            return jvp(g, (theta,), (v,))[1]

        product = vmap(one)(vectors)
        return product if out is None else out.add_(product)

    def ggn_vp(
        self, theta: Tensor, batch: Batch, vectors: Tensor, weight: float, mode: HVPMode = "reverse"
    ) -> Tensor:
        """Generalised Gauss-Newton ``weight * sum_i J_i^T H_out,i J_i v``, ``(k, p)``.

        Positive semi-definite whenever the loss is convex in the outputs (cross-entropy, squared
        error, smooth hinge), unlike the Hessian of a non-convex network. Like :meth:`hvp`, it
        leaves the regulariser to :meth:`regularizer_hvp`.
        """
        self._require_gauss_newton()
        if mode == "reverse":
            return self.linearize(theta, batch, weight, "gauss_newton")(vectors)
        check_hvp_mode(mode)

        def out_fn(t: Tensor) -> Tensor:
            return self.outputs(t, batch)

        def out_loss(o: Tensor) -> Tensor:
            return weight * self.task.output_loss(o, batch).sum()

        outputs, pullback = vjp(out_fn, theta)

        def one(v: Tensor) -> Tensor:
            jv = jvp(out_fn, (theta,), (v,))[1]
            hjv = jvp(grad(out_loss), (outputs,), (jv,))[1]
            return pullback(hjv)[0]

        return vmap(one)(vectors)

    def _require_gauss_newton(self) -> None:
        if not self.task.supports_gauss_newton:
            raise TaskError(
                "Gauss-Newton curvature needs a task that defines outputs(model, batch) and "
                "output_loss(outputs, batch) instead of overriding loss(); or use curvature='hessian'"
            )


class Linearized:
    """One batch's curvature as a linear map on ``(k, p)`` blocks, with the autograd graph it keeps.

    ``nbytes``: memory held by the graph beyond the parameters and the batch (measured when built
    with ``measure=True``; otherwise only the gradient's own size).
    """

    def __init__(self, apply: Callable[[Tensor], Tensor], nbytes: int) -> None:
        self._apply = apply
        self.nbytes = nbytes

    def __call__(self, vectors: Tensor) -> Tensor:
        """``(k, p)`` -> ``(k, p)``."""
        return self._apply(vectors)


def _pull(out: Tensor, inputs: Tensor, cotangents: Tensor, loop: bool = False) -> Tensor:
    """``vjp`` of ``out`` w.r.t. ``inputs`` for each cotangent of ``(k, *out.shape)``, keeping the graph.

    ``loop``: one backward pass per cotangent (see :attr:`ModelFunction.loops_over_vectors`).
    """

    def one(v: Tensor) -> Tensor:
        (r,) = torch.autograd.grad(out, inputs, v, retain_graph=True, materialize_grads=True)
        return r

    if cotangents.shape[0] == 1:  # one backward pass: cheaper than a batched one of size 1
        return one(cotangents[0])[None]
    if loop:
        return torch.stack([one(v) for v in cotangents])
    # torch.func's vmap, not autograd's is_grads_batched: the latter's batching rules miss the
    # second derivatives of tanh, GELU, softplus and log_softmax, and loop over the vectors there
    # (an MLP with tanh: 1.5x slower at 256 vectors)
    return torch.func.vmap(one)(cotangents)


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _unpack(t: Tensor) -> Tensor:
    return t
