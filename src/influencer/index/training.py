"""A gradient store collected during training, from the backward passes training already runs.

A Kronecker projection (:mod:`influencer.index.kronecker`) needs, per layer and example, only the
layer's inputs ``a_t`` and the gradients of its outputs ``g_t``: ``(P_out ⊗ P_in) vec(DW) =
vec(sum_t (P_out g_t)(P_in a_t)^T)``. A training step computes both for its batch: hooks on the
layers project the inputs in the forward pass and the output gradients in the backward pass, and
one small product per layer gives every example's projected gradient. No extra forward or backward
pass, and no ``p``-dimensional per-example gradient, is ever formed::

    store = TrainingStore(model, task, (x, y), "runs/store", TrainingStoreSettings(
        checkpoints=(0, 500), projector=KroneckerProjector(k_in=24, k_out=24, basis="random")))
    for step, ids in enumerate(batches):                   # ids: the batch's training-example ids
        with store.step(ids, lr=opt.param_groups[0]["lr"]):
            loss = task.loss(model, (x[ids], y[ids])).mean()   # the loss training backpropagates
            opt.zero_grad()
            loss.backward()
        opt.step()
    store.finish()                                         # raises if a window saw too few examples

**Windows.** At each checkpoint step ``s`` (counted in ``step()`` calls, from 0) a window opens,
before that step's forward pass, at the parameters ``theta_s``; it records the projected gradient
of every example in the following steps' batches (the first time it appears) until all ``n``
training examples were seen, i.e. one epoch, and is then written as a store in ``<path>/step-<s>``
(in a background thread while training goes on, which also scales the rows, checks that they
are finite and hashes the fingerprint; an error there is raised by the next :meth:`~TrainingStore.step`,
:meth:`~TrainingStore.flush` or :meth:`~TrainingStore.finish`, which waits for every store):
the format of :meth:`~influencer.index.GradientIndex.build`, whose header (fingerprint of the model
at ``theta_s``, projector, ``n``, ``k``, chunk) gains ``"training": {"step", "lr"}``. The window
keeps ``theta_s`` (the chosen parameters, and copies of the buffers and other parameters training
changes in place) for the fingerprint: the model's classes, its task and the data (all of it) are
hashed in the first window, only the weights in later ones, and none of it on training's thread
unless the checkpoint's directory already holds a store to compare with. The
model state at ``theta_s`` (floating parameters and buffers, ``parameters.npy``) goes with it, so
:class:`~influencer.index.checkpoints.CheckpointStores` can rebuild the
model at every checkpoint. :meth:`GradientIndex.open <influencer.index.GradientIndex.open>` opens
it like any store, for the model at ``theta_s``.

**What a row holds.** Row ``i`` is ``P grad(loss_i)(theta_t) + P grad Omega(theta_s)`` where ``t``
is the step of the window that saw example ``i``: the loss gradient training computed (TracIn's
per-step gradient), the task's regulariser at the checkpoint. When the parameters do not move during
the window (gradient accumulation over the epoch, i.e. full-batch steps) it is exactly the row
:meth:`GradientIndex.build` computes at ``theta_s``: the same operations
(:func:`~influencer.index.kronecker.input_projector`,
:func:`~influencer.index.kronecker.call_product`), so bit for bit when ``loss_scale`` is a power of
two (the rescaling is then exact) and the batches are the same (``hold_mb=0``: see below), up to
float rounding otherwise. The gradients are those of the module's mode during training: dropout or
batch statistics make them differ from the evaluation-mode gradients of a post-hoc store; under
mixed precision (autocast) they come from the half-precision activations and output gradients
training computes, projected in the factors' dtype. The first window's first step is checked against
a post-hoc projection of its batch's first 8 examples (``check=True``, to that precision's
rounding), which catches a training loss that is not the one ``loss_scale`` describes.

**Held steps.** A small model's step is made of small operations, and between a training step's
kernels each operation costs tens of microseconds however small it is: projecting each step's 64
examples in its own backward pass added 0.9-1.1 ms to a digits CNN's 2.1 ms step.
So a window holds small steps (a step larger than half of ``hold_mb`` is projected in its backward
pass) and projects them together, in the writer thread, beside training. At each step's end the
layers' inputs and output gradients are copied into a group's buffers, after the steps before it
of the same shapes; a group holds the window's examples, or as many as half of ``hold_mb`` holds,
and is projected as one batch once the window closes or the group is full (or the next step's
shapes differ). Its buffers then hold a later group's steps, in this window or the next: memory
training's own steps do not fault in again. The copies free the step's tensors at once (held,
they would make the next step take new memory, cold in the caches), leave nothing to concatenate,
and make the rows immune to what training does to its tensors after the step; an activation
modified in place between its layer and the step's end, or an output gradient after the store's
hook saw it, is refused. The projection's large
operations release the interpreter while they run, so on a machine with a core to spare training
hardly waits for them. The rows are those of steps projected alone, up to the rounding of products
over more rows.

**The writer's core.** The writer's work takes a core (for a digits CNN's window, its projection and
files, about 16 ms of CPU). Where training's torch threads fill every usable core, that is a core
of theirs, and each of training's parallel operations then waits for the thread the writer
displaced: training loses about the writer's CPU time, and more. So by default (``spare_core``)
the steps that find the writer busy run on one torch thread fewer, and the first step that finds it
done puts the number back (so do :meth:`~TrainingStore.flush`, :meth:`~TrainingStore.finish` and a
step that raises); a number the training loop sets meanwhile is its own and is kept.

Cost per collected step: per layer two thin products (``B T d k`` for each side; the inputs are
projected when the output gradient is there) and one ``(k_out, k_in)`` product per example, copied
into the window's rows (``n k`` values, in id order), which are scaled, checked and written in
chunks when it closes; a held step, the copy of its inputs and output gradients; a PCA
basis costs its fit (a forward and backward pass over ``pca_examples`` training examples) when the
window opens; ``fisher`` costs ``n sum_l k_l^2`` when it closes.
``benchmarks/bench_training_store.py`` measures the overhead.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from influencer._kernel.data import as_examples
from influencer._kernel.errors import ConfigError, DataError, NonFiniteError
from influencer._kernel.files import atomic_save_array, json_roundtrip
from influencer._kernel.fingerprint import hash_tensors
from influencer._kernel.threads import SpareCore, background_pool
from influencer.estimators.auto import choose_estimator
from influencer.index.gradient_index import add_fisher, fisher_setting, fisher_spans
from influencer.index.kronecker import KroneckerProjection, KroneckerProjector, call_product, sum_calls
from influencer.index.store import FORMAT, VERSION, IndexStoreError, StoreLayout, mismatch
from influencer.influence import Influence

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
LossScale = str | float | Callable[[Tensor], "float | Tensor"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingStoreSettings:
    """What a :class:`TrainingStore` collects, validated on construction.

    Args:
        checkpoints: the steps (``step()`` calls, from 0) at which a window opens; increasing.
        projector: a :class:`~influencer.index.KroneckerProjector` (the only projection that needs
            nothing but the layers' inputs and output gradients).
        loss_scale: how the loss training backpropagates relates to the task's per-example
            losses: ``"mean"`` (their mean over the batch, the default), ``"sum"`` (their sum), a
            number ``c`` (their sum divided by ``c``, e.g. ``n`` for full-batch accumulation), or a
            callable ``ids -> c`` (a number or one per example, ``(B,)``).
        chunk: training examples per stored chunk, as in ``GradientIndex.build``.
        fisher: also store the projected Fisher (``"layers"``, ``"full"``) for ``ProjectedFisher``
            queries; default ``False`` (TracIn-style queries need none).
        check: compare the first window's first batch (its first 8 examples) with a post-hoc
            projection at the same parameters (one extra forward and backward pass of those).
        overwrite: replace a store built from other inputs in a checkpoint's directory.
        hold_mb: MiB of the layers' inputs and output gradients the store may hold to project
            several steps together, in fewer and larger operations (the same rows, up to the rounding
            of products over more rows): two groups' buffers of half of it each (one filling, one
            projected; kept from window to window until :meth:`TrainingStore.finish`); a step larger
            than half of it is projected in its backward pass, as every step is with ``0``.
        spare_core: while the writer thread works (projecting held steps, finishing a closed
            window) and training's torch threads fill every usable core, run training on one thread
            fewer (``torch.set_num_threads``), from the step that finds the writer busy to the first
            that finds it done, or :meth:`TrainingStore.flush` / :meth:`~TrainingStore.finish`
            (a number set meanwhile by the training loop is kept); ``False``: never change it.
    """

    checkpoints: tuple[int, ...]
    projector: KroneckerProjector
    loss_scale: LossScale = "mean"
    chunk: int = 2048
    fisher: bool | str = False
    check: bool = True
    overwrite: bool = False
    hold_mb: float = 32.0
    spare_core: bool = True

    def __post_init__(self) -> None:
        steps = tuple(self.checkpoints) if isinstance(self.checkpoints, (list, tuple, range)) else None
        if (
            not steps
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps)
            or list(steps) != sorted(set(steps))
        ):
            raise ConfigError(
                "TrainingStoreSettings.checkpoints must be a non-empty increasing sequence of step "
                f"numbers >= 0 (step() calls, from 0), got {self.checkpoints!r}"
            )
        object.__setattr__(self, "checkpoints", steps)
        if not isinstance(self.projector, KroneckerProjector):
            raise ConfigError(
                "TrainingStoreSettings.projector must be a KroneckerProjector: a training step yields the "
                "layers' inputs and output gradients, not per-example gradients, so a dense projection "
                f"(got {type(self.projector).__name__}) would need a pass of its own; use "
                "GradientIndex.build after training for it"
            )
        scale = self.loss_scale
        ok = (
            scale in ("mean", "sum")
            if isinstance(scale, str)
            else callable(scale)
            or (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0)
        )
        if not ok:
            raise ConfigError(
                "TrainingStoreSettings.loss_scale must be 'mean', 'sum', a positive number or a callable "
                f"ids -> number, got {scale!r}"
            )
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise ConfigError(f"TrainingStoreSettings.chunk must be a positive integer, got {self.chunk!r}")
        fisher_setting(self.fisher)
        hold = self.hold_mb
        if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold < float("inf"):
            raise ConfigError(
                f"TrainingStoreSettings.hold_mb must be a number of MiB >= 0 (0: no step held), got {hold!r}"
            )
        if not isinstance(self.spare_core, bool):
            raise ConfigError(
                f"TrainingStoreSettings.spare_core must be True or False, got {self.spare_core!r}"
            )


class _Window:
    """One checkpoint's collection: the model at ``theta_s``, its projection, the rows seen so far."""

    def __init__(self, store: TrainingStore, step: int, lr: float) -> None:
        settings = store.settings
        self.step, self.lr = step, float(lr)
        options = store.influence_options
        if "estimator" not in options:
            # the parameters the default estimator would cover, without its look at the data (which
            # only picks that estimator's Fisher; the store uses no estimator)
            choice = choose_estimator(store.model, store.task, None, params=options["params"])
            options = {"params": choice.params, "estimator": choice.estimator, "curvature": choice.curvature}
        self.influence = Influence(
            store.model, store.task, store.train, batch_size=store.batch_size, **options
        )
        # the first window's choices (the default estimator picks the parameters) for the others,
        # which then skip choosing them again
        store.influence_options = {
            "params": list(self.influence.fn.names),
            "estimator": self.influence.estimator,
            "curvature": self.influence.curvature_kind,
        }
        fn = self.influence.fn
        # the model at theta_s, not the module's tensors that training goes on changing: its
        # buffers and unchosen parameters copied (theta is a copy already), for what reads them
        # later (the fingerprint, hashed in the writer thread)
        fn.freeze()
        # one projection for every window: the same layers and, for a random basis, the same factors
        # (a PCA basis is fitted again below, in a copy)
        if store.projection is None:
            store.projection = settings.projector.bind(fn)
        self.projection: KroneckerProjection = store.projection
        self.layout = StoreLayout(Path(store.path) / f"step-{step:08d}")
        # the header but its fingerprint, made where first needed (see header())
        self.info = json_roundtrip(
            {
                "projector": settings.projector.settings(),
                "projection": self.projection.info,
                "n": self.influence.n,
                "p": self.influence.p,
                "k": self.projection.k,
                "chunk": settings.chunk,
                "fisher": fisher_setting(settings.fisher),
                "training": {"step": step, "lr": self.lr},
            }
        )
        self._fingerprint = functools.partial(store.fingerprint, self.influence)
        self._header: dict[str, Any] | None = None
        self.done = self._open_layout(settings.overwrite, check=not store.written)
        if self.done:
            return
        if self.projection.needs_fit:
            # a basis of its own (fitting rebinds the factors): a closed window may still be
            # projecting its held steps with its basis in the writer thread
            self.projection = copy.copy(self.projection)
            self.projection.fit(self.influence)
        self.regularizer = self.projection.regularizer_row(fn, self.influence.theta)
        n = self.influence.n
        # the window's rows in id order, written as each step's products come (one indexed copy per
        # layer), and each row's loss scale; multiplied and checked when the window closes, in the
        # writer thread
        self.rows = torch.empty(n, self.projection.k, dtype=fn.dtype, device=fn.device)
        self.scales = torch.empty(n, 1, dtype=fn.dtype, device=fn.device)
        self.blocks = [  # per layer, its columns of the rows as (n, k_out, k_in)
            self.rows[:, self.projection.offsets[i] : self.projection.offsets[i + 1]].view(
                n, layer["k_out"], layer["k_in"]
            )
            for i, layer in enumerate(self.projection.info["layers"])
        ]
        # which ids the window has seen; a bytearray, read in a Python loop over the batch's ids:
        # between a step's kernels each numpy call costs tens of microseconds (cold caches), 64 ids
        # in Python a few
        self.seen = bytearray(n)
        self.count = 0  # ids seen
        # what the store records of theta_s, kept until the window's files are written at its end
        self.names, state = model_state(fn.model)
        self.state = state.numpy()
        self.basis = self.projection.state().numpy() if self.projection.needs_fit else None
        self.hooks = _Hooks(self.projection)
        self.buffers = store.buffers
        self.held: list[_Group] = []  # closed groups of held steps, to be projected
        self.group: _Group | None = None  # the group the next held steps are copied into
        self.failed = False  # a projection of held steps failed (in the writer thread)

    def _open_layout(self, overwrite: bool, check: bool) -> bool:
        """Whether a complete store from the same inputs is already there (nothing to collect);
        with ``check``, refuse now a directory the store's files could not be written to."""
        layout = self.layout
        layout.check_empty_or_index()
        if check:
            layout.check_writable()
        old = layout.read_manifest()
        if old is None:
            return False
        header = self.header()
        if old["header"] == header:
            return old["status"] == "complete"
        if not overwrite:
            raise IndexStoreError(
                f"{layout.root} holds an index built from other inputs "
                f"({mismatch(old['header'], header)}); "
                "pass TrainingStoreSettings(overwrite=True) to replace it, or choose another path"
            )
        return False

    def header(self) -> dict[str, Any]:
        """The store's header: its fingerprint (the weights at theta_s hashed; in the first window
        also the model's classes, its task and the training data) and :attr:`info`. Made once, where
        first needed: when the window opens only if its directory holds a store to compare with,
        else in the writer thread when the window is written, beside training."""
        if self._header is None:
            self._header = json_roundtrip({"fingerprint": self._fingerprint(), **self.info})
        return self._header

    def add(self, ids: Tensor, at: list[int], taken: list[Tensor | None] | _Held, scale: Tensor) -> None:
        """Take a step's rows for the ids ``(B,)`` not seen yet (an id repeated in the batch: its
        first occurrence): its products (:meth:`_Hooks.take`), written now, or its held inputs and
        output gradients, copied into the open group and projected with it later (:meth:`project`);
        ``at``: the ids as a list (in ``[0, n)``), ``scale`` ``(B or 1, 1)``."""
        seen, keep = self.seen, []
        for j, i in enumerate(at):
            if not seen[i]:
                seen[i] = 1
                keep.append(j)
        self.count += len(keep)
        if not keep:  # every id seen before
            return
        # None: every id; else repeated or seen ids, and the first occurrences of unseen ones kept
        kept = None if len(keep) == len(at) else keep
        if not isinstance(taken, _Held):
            self._write(ids, kept, taken, scale)
            return
        group = self.group
        if group is not None and not group.fits(taken):
            self.close_group()
            group = None
        if group is None:
            group = self.group = _Group(self.buffers, taken, len(self.seen))
        group.put(taken, _Pending(ids, kept, scale))

    def close_group(self) -> None:
        """Make the open group ready for projection (:attr:`held`)."""
        if self.group is not None:
            self.held.append(self.group)
            self.group = None

    def take_held(self) -> list[_Group]:
        """The closed groups (for :meth:`project`), no longer held."""
        held, self.held = self.held, []
        return held

    def project(self, held: list[_Group], stream: Any = None) -> None:
        """Project closed groups and write their rows: each group as one batch (its buffers then
        free for another group).

        Runs in the store's writer thread, beside training: its operations are few and large, and
        release the interpreter while they run; on a GPU in training's CUDA ``stream``, after the
        kernels that made the steps' tensors. A failure marks the window, which is then not written.
        """
        try:
            with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
                for group in held:
                    self._project(group.calls(), group.filled, group.steps)
                    group.release()
        except BaseException:
            self.failed = True
            raise

    def _project(self, calls: list[list[_Call]], batch: int, steps: list[_Pending]) -> None:
        """Write the rows of ``steps``, whose inputs and output gradients ``calls`` hold
        (``batch`` rows, the steps' in turn)."""
        products = self.hooks.project(calls, batch)
        # the steps' kept positions in the batch, and their scales
        keep, offset = [], 0
        for pending in steps:
            n = len(pending.ids)
            keep.extend(
                range(offset, offset + n) if pending.kept is None else (offset + j for j in pending.kept)
            )
            offset += n
        first = steps[0].scale
        if all(p.scale is first and len(first) == 1 for p in steps):  # one rule for every step
            scale = first
        else:
            scale = torch.cat([p.scale.expand(len(p.ids), 1) for p in steps])
        ids = steps[0].ids if len(steps) == 1 else torch.cat([p.ids for p in steps])
        self._write(ids, None if offset == len(keep) else keep, products, scale)

    def _write(
        self, ids: Tensor, keep: list[int] | None, products: list[Tensor | None], scale: Tensor
    ) -> None:
        """Write products ``(B, k_out, k_in)`` per layer and scales ``(B or 1, 1)`` into the rows of
        ``ids`` ``(B,)`` (those at positions ``keep``, or all)."""
        if keep is not None:
            index = torch.tensor(keep)
            on = index.to(scale.device)
            ids, products = ids[index], [None if y is None else y[on] for y in products]
            scale = scale[on] if len(scale) > 1 else scale
        ids = ids.to(self.rows.device)
        for block, y in zip(self.blocks, products, strict=True):
            if y is None:  # no output gradient reached the layer
                block[ids] = 0.0
            else:
                block.index_copy_(0, ids, y if y.dtype == block.dtype else y.to(block.dtype))  # ids distinct
        self.scales[ids] = scale

    def gathered(self) -> Tensor:
        """Every example's row ``(n, k)`` with the regulariser's, in id order (once the window is
        complete), checked finite."""
        out, self.rows, self.blocks = self.rows, None, []
        # the output gradients times the loss's scale (bilinear; exact for a power of two)
        out.mul_(self.scales)
        out += self.regularizer  # every row's objective carries the regulariser's gradient
        check_finite_rows(out, self.step)
        return out

    @property
    def complete(self) -> bool:
        return self.count == len(self.seen)

    def finished(self) -> None:
        """Scale the rows (in id order already), add the regulariser, check them, accumulate the
        Fisher and write the store.

        Runs in the store's writer thread: the window's tensors are its own (the next window
        allocates its rows anew), so training goes on meanwhile.
        """
        if self.failed:
            raise IndexStoreError(
                f"the store of step {self.step} was not written: projecting some of its steps failed "
                "(raised before)"
            )
        inf, header = self.influence, self.header()
        n, chunk, k = inf.n, header["chunk"], header["k"]
        rows = self.gathered()
        dtype = header["projector"]["dtype"]
        stored = rows.to(_TORCH_DTYPES[dtype]).cpu()
        chunks = [(j * chunk, stored[j * chunk : (j + 1) * chunk].numpy()) for j in range(-(-n // chunk))]
        fisher = None
        if header["fisher"]:  # from the stored values, as GradientIndex.build accumulates it
            accumulate = torch.float64 if dtype == "float64" else torch.float32
            total = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
            spans = fisher_spans(self.projection, header["fisher"])
            for _, part in chunks:
                add_fisher(total, torch.from_numpy(part).to(rows.device, accumulate), spans)
            fisher = (total / n).cpu().numpy()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "status": "complete",
            "header": header,
        }
        arrays = {
            "basis": self.basis,
            "parameters": self.state,
            "fisher": fisher,
            "regularizer": self.regularizer.double().cpu().numpy(),
        }
        _write_store(self.layout, manifest, self.names, arrays, chunks)


def _write_store(
    layout: StoreLayout,
    manifest: dict[str, Any],
    names: list[str],
    arrays: dict[str, np.ndarray | None],
    chunks: list[tuple[int, np.ndarray]],
) -> None:
    """Write a window's store: its arrays and chunks, then the manifest that makes it complete.

    The whole window is in hand, so there is nothing to resume: no chunk record files and no
    ``"building"`` manifest, only the files a complete store holds.
    """
    layout.clear()
    layout.check_writable()
    files = {"basis": layout.basis_path, "fisher": layout.fisher_path, "regularizer": layout.regularizer_path}
    files["parameters"] = layout.root / "parameters.npy"
    entries: dict[str, Any] = {}
    for key, array in arrays.items():
        if array is not None:
            entries[key] = {"file": files[key].name, "sha256": atomic_save_array(files[key], array)}
    entries["parameters"]["names"] = names
    records = [layout.save_chunk(j, rows, first, record=False) for j, (first, rows) in enumerate(chunks)]
    layout.write_manifest({**manifest, **entries, "chunks": records})


_Call = tuple[Any, "Tensor | None"]
"""A held layer call: its input and its output gradient (None: none reached the layer)."""


@dataclasses.dataclass
class _Held:
    """A held step's layer calls (per layer and call, a :data:`_Call`), until the window copies them
    into a group: the batch size, the bytes they hold, and their shapes (per example: the steps of a
    group have the same)."""

    calls: list[list[_Call]]
    batch: int
    bytes: int
    shapes: tuple[Any, ...]


class _Pending(NamedTuple):
    """A held step in a window's group: its ids ``(B,)``, the positions kept (None: all; else its
    first occurrences of ids not seen before) and its scale ``(B or 1, 1)``."""

    ids: Tensor
    kept: list[int] | None
    scale: Tensor


class _Buffers:
    """The buffers of projected groups, kept for later groups of the same shapes (two sets at
    most): a window's groups are copied into memory that training's own steps do not fault in
    again, and the writer thread projects them without concatenating steps."""

    def __init__(self, budget: float) -> None:
        self.budget = budget  # bytes a group may hold: half of hold_mb (one filling, one projected)
        self._idle: list[tuple[Any, list[list[tuple[Tensor, Tensor | None]]]]] = []
        self._lock = threading.Lock()  # given back by the writer thread, taken by training's

    def take(self, key: Any) -> list[list[tuple[Tensor, Tensor | None]]] | None:
        with self._lock:
            for j, (k, tensors) in enumerate(self._idle):
                if k == key:
                    del self._idle[j]
                    return tensors
        return None

    def give(self, key: Any, tensors: list[list[tuple[Tensor, Tensor | None]]]) -> None:
        with self._lock:
            self._idle.append((key, tensors))
            del self._idle[:-2]

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


class _Group:
    """Held steps of the same shapes, their layers' inputs and output gradients copied at each
    step's end into buffers of ``capacity`` examples, projected as one batch.

    The copy replaces holding the step's tensors: those go back to training's allocator at once (a
    held tensor makes the next step's take new memory, faulted in, cold in the caches), nothing
    is concatenated later, and an activation training edits in place after its step cannot change
    the rows.
    """

    def __init__(self, buffers: _Buffers, first: _Held, n: int) -> None:
        self.shapes = first.shapes
        per_example = max(1, first.bytes // max(1, first.batch))
        # the window's n examples where they fit (one group per window: the buffers are reused by
        # the next window's), else as many as half of hold_mb holds
        self.capacity = max(first.batch, min(n, int(buffers.budget // per_example)))
        self.key = (self.shapes, self.capacity)
        self.pool = buffers
        tensors = buffers.take(self.key)
        if tensors is None:
            size = self.capacity
            tensors = [
                [
                    (
                        x.new_empty((size, *x.shape[1:])),
                        None if g is None else g.new_empty((size, *g.shape[1:])),
                    )
                    for x, g in layer
                ]
                for layer in first.calls
            ]
        self.tensors: list[list[tuple[Tensor, Tensor | None]]] | None = tensors
        self.filled = 0
        self.steps: list[_Pending] = []

    def fits(self, held: _Held) -> bool:
        return held.shapes == self.shapes and self.filled + held.batch <= self.capacity

    def put(self, held: _Held, pending: _Pending) -> None:
        """Copy the step's inputs and output gradients in, after the rows already there."""
        assert self.tensors is not None
        start, end = self.filled, self.filled + held.batch
        for calls, tensors in zip(held.calls, self.tensors, strict=True):
            for (x, g), (xb, gb) in zip(calls, tensors, strict=True):
                xb[start:end].copy_(x)
                if gb is not None:
                    gb[start:end].copy_(g)
        self.filled = end
        self.steps.append(pending)

    def calls(self) -> list[list[_Call]]:
        """The group's layer calls over its ``filled`` rows."""
        assert self.tensors is not None
        f = self.filled
        return [[(xb[:f], None if gb is None else gb[:f]) for xb, gb in layer] for layer in self.tensors]

    def release(self) -> None:
        """Give the buffers back for a later group (once projected)."""
        if self.tensors is not None:
            self.pool.give(self.key, self.tensors)
            self.tensors = None


class _Hooks:
    """Forward hooks keeping each layer call's input; tensor hooks on its outputs forming, as each
    output gradient arrives, the call's projected input and product
    (:func:`~influencer.index.kronecker.call_product`), or, in a held step, keeping the gradient.

    The inputs are projected in the backward pass, not the forward: autograd keeps a layer's input
    until then anyway (for its weight's gradient), so the step holds no projected copy between the
    passes, and each projection is used while it is still in the cache. A held step keeps its inputs
    and output gradients instead until its end, when the window copies them into a group projected
    with other steps' (:meth:`project`): between a training step's kernels each operation costs tens
    of microseconds however small it is, so a few large ones cost far less than many small ones.
    """

    def __init__(self, projection: KroneckerProjection) -> None:
        self.projection, self.batch, self.active, self.hold = projection, 0, False, False
        # registered once per window; between its steps (active False) they return at once
        self.handles = [
            layer.module.register_forward_hook(self._forward(i)) for i, layer in enumerate(projection.layers)
        ]

    def start(self, batch: int, hold: bool) -> None:
        """Record the next forward and backward pass, of ``batch`` examples (their inputs and output
        gradients kept, with ``hold``)."""
        layers = self.projection.layers
        self.inputs: list[list[Any]] = [[] for _ in layers]  # per layer and call: (input, its version)
        # per layer, call -> (B, k_out, k_in) product, or (held) -> output gradient, and its version
        # when the store's hook saw it (checked at the step's end)
        self.products: list[dict[int, Tensor | None]] = [{} for _ in layers]
        self.versions: list[dict[int, int]] = [{} for _ in layers]
        self.batch, self.active, self.hold = batch, True, hold
        self.bytes = 0  # of the inputs and output gradients met
        self.reduced: torch.dtype | None = None  # a lower precision met in the step (autocast)

    def _forward(self, i: int):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            if not self.active:
                return
            call = len(self.inputs[i])
            x = inputs[0]  # kept as it is: autograd keeps it until the backward pass anyway
            if isinstance(x, Tensor):
                self.inputs[i].append((x, x._version))
                self.bytes += x.nbytes
            else:
                self.inputs[i].append((x, None))
            if output.requires_grad:
                # registered on the output itself, so an in-place edit of it later is still seen
                output.register_hook(lambda g: self._backward(i, call, g))

        return hook

    def _backward(self, i: int, call: int, g: Tensor) -> None:
        # formed now, the product holds (B, k_out, k_in) values instead of the call's rows until the
        # step ends; a second backward pass in the step (retain_graph) adds, as parameters' .grad do
        x, version = self.inputs[i][call]
        if version is not None and x._version != version:
            raise self._edited(i, "after the layer ran, before the backward pass")
        self.bytes += g.nbytes
        # under autocast the activations and gradients may be half precision (projected in the
        # factors' dtype, the post-hoc store's): the lowest met, the first batch's check's tolerance
        dtype = self.projection.factors[i][1].dtype
        for t in (x, g):
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
                self.reduced = _lower(self.reduced, t.dtype, dtype)
        # a held step keeps the gradient (of a create_graph backward pass: without its graph)
        y = (g.detach() if g.requires_grad else g) if self.hold else self._product(i, x, g, self.batch)
        earlier = self.products[i].get(call)
        y = y if earlier is None else earlier + y
        self.products[i][call] = y
        if self.hold:
            self.versions[i][call] = y._version

    def _edited(self, i: int, when: str, what: str = "input") -> ConfigError:
        return ConfigError(
            f"the {what} of layer {self.projection.layers[i].name!r} was modified in place {when}: the "
            "store projects it then. Modify a copy (e.g. x = x + ..., not x += ...), or pass "
            "TrainingStoreSettings(hold_mb=0) to project every step in its own backward pass"
        )

    def _product(self, i: int, x: Any, g: Tensor, batch: int) -> Tensor:
        """One call's :func:`~influencer.index.kronecker.call_product` of ``batch`` examples."""
        layer = self.projection.layers[i]
        # in the factors' dtype (autocast: from half precision), outside autocast (the backward pass)
        dtype = self.projection.factors[i][1].dtype
        if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        if g.dtype != dtype:
            g = g.to(dtype)
        with torch.no_grad():  # (a create_graph backward pass would otherwise record the projection)
            pa = self.projection.inputs[i](x, batch)
            return call_product(pa, layer.output_grads(g, batch), self.projection.output_factor(i))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def take(self) -> list[Tensor | None] | _Held:
        """Per layer, the sum of its calls' products in call order ``(B, k_out, k_in)`` (None: no
        call had a gradient); of a held step, its calls (:class:`_Held`)."""
        for i, layer in enumerate(self.projection.layers):
            if not self.inputs[i]:
                raise ConfigError(
                    f"layer {layer.name!r} was not called in the training step's forward pass; leave it "
                    "out of the store (Influence params) or run the forward inside store.step()"
                )
        pairs = zip(self.inputs, self.products, strict=True)
        if not self.hold:
            return [sum_calls(p.get(call) for call in range(len(calls))) for calls, p in pairs]
        held: list[list[_Call]] = []
        for i, (calls, grads) in enumerate(pairs):
            layer: list[_Call] = []
            for call, (x, version) in enumerate(calls):
                if version is not None:
                    if x._version != version:
                        raise self._edited(i, "after the layer ran, before the step ended")
                    x = x.detach()  # without its graph (the same values and version counter)
                g = grads.get(call)
                if g is not None and g._version != self.versions[i][call]:
                    raise self._edited(
                        i,
                        "after the backward pass reached the layer, before the step ended",
                        "output gradient",
                    )
                layer.append((x, g))
            held.append(layer)
        shapes = _shapes(held, self.batch)
        if shapes is None:  # not batch-first: projected now, which names the layer
            return self.project(held, self.batch)
        return _Held(held, self.batch, self.bytes, shapes)

    def project(self, calls: list[list[_Call]], batch: int) -> list[Tensor | None]:
        """Per layer, the sum of its calls' products ``(batch, k_out, k_in)`` of held inputs and
        output gradients ``calls``."""
        return [
            sum_calls(None if g is None else self._product(i, x, g, batch) for x, g in layer)
            for i, layer in enumerate(calls)
        ]


def _shapes(calls: list[list[_Call]], batch: int) -> tuple[Any, ...] | None:
    """:attr:`_Held.shapes` of a held step's calls (None: an input or gradient is not batch-first)."""
    shapes: list[Any] = [len(layer) for layer in calls]
    for x, g in (call for layer in calls for call in layer):
        if not isinstance(x, Tensor) or x.shape[0] != batch or (g is not None and g.shape[0] != batch):
            return None
        shapes.append(
            (x.shape[1:], x.dtype, x.device, None if g is None else (g.shape[1:], g.dtype, g.device))
        )
    return tuple(shapes)


_CHECKED = 8  # examples of the first batch compared with a post-hoc projection
_HALF_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}  # relative, of a batch's rows


def _lower(seen: torch.dtype | None, dtype: torch.dtype, target: torch.dtype) -> torch.dtype | None:
    """The lowest precision among ``seen`` and ``dtype`` where ``dtype`` is coarser than ``target``."""
    if torch.finfo(dtype).eps <= torch.finfo(target).eps:
        return seen
    return dtype if seen is None or torch.finfo(dtype).eps > torch.finfo(seen).eps else seen


def check_finite_rows(rows: Tensor, step: int) -> None:
    """Raise :class:`NonFiniteError` naming the examples whose rows ``(n, k)`` are not finite."""
    # one sum first (the element-wise test takes 40 times as long); a sum can also overflow, so a
    # non-finite one is only a reason to look at every entry
    if bool(torch.isfinite(rows.sum())):
        return
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteError(
            "the training-loss gradient is NaN or infinite for example(s) "
            f"{bad.nonzero().flatten()[:10].tolist()} in the window of step {step}: check the loss and "
            "the learning rate (training diverged?); no store was written for it"
        )


class TrainingStore:
    """Collects gradient stores at checkpoints of a training loop (see the module docstring).

    Args:
        model: the model being trained (its layers are hooked while a window is open, and record
            only inside :meth:`step`).
        task: the :class:`~influencer.Task` whose per-example loss the stored gradients are of.
        train: the training data, indexed by the ids passed to :meth:`step`.
        path: directory holding one store per checkpoint, ``step-<s>``.
        settings: :class:`TrainingStoreSettings`.
        params: the parameters the stores cover, as ``Influence(params=...)`` (every one must be in
            a supported layer; transformers' tied embeddings are not).
        batch_size: examples per batch of the PCA fit and of the first-batch check.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        train: Any,
        path: str | Path,
        settings: TrainingStoreSettings,
        *,
        params: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(settings, TrainingStoreSettings):
            raise ConfigError(f"settings must be a TrainingStoreSettings, got {type(settings).__name__}")
        self.model, self.task, self.train = model, task, as_examples(train)
        self.path = Path(path)
        self.settings = settings
        self.influence_options: dict[str, Any] = {"params": list(params) if params is not None else None}
        self.batch_size = batch_size
        self.steps = 0  # step() calls so far
        self.window: _Window | None = None
        self.written: list[Path] = []
        self.checked = not settings.check  # the loss is checked on the first window's first batch
        self._fingerprint: dict[str, Any] | None = None
        self._fingerprint_lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None  # writes closed windows' files beside training
        self.projection: KroneckerProjection | None = None  # bound on the first window, then reused
        self._writes: list[tuple[Future[None], Path]] = []  # closed windows being finished
        self._scales: dict[tuple[Any, ...], Tensor] = {}  # see _device_scale
        self._step_bytes = 0  # inputs and output gradients of the last collecting step (0: none yet)
        self.buffers = _Buffers(settings.hold_mb * 2**20 / 2)  # of held steps' groups
        self._spare = SpareCore(settings.spare_core)  # training's threads while the writer works

    def fingerprint(self, influence: Influence) -> dict[str, Any]:
        """``influence.settings()["gradients"]``; after the first window only the weights are hashed again.

        The model's classes (their source files), the task and the training data do not change
        during training, and hashing them (the data: all of it) at every checkpoint would cost more
        than collecting.
        """
        with self._fingerprint_lock:  # (windows' headers are made in the writer thread, or at opening)
            if self._fingerprint is None:
                self._fingerprint = json_roundtrip(influence.settings()["gradients"])
                return self._fingerprint
            first = self._fingerprint
        state = hash_tensors(influence.fn.state(influence.theta))
        return {**first, "model": {**first["model"], "state": state}}

    @property
    def collecting(self) -> bool:
        """Whether the next :meth:`step` records gradients (a window is or will be open)."""
        return self.window is not None or self.steps in self.settings.checkpoints

    @contextlib.contextmanager
    def step(
        self, ids: Sequence[int] | Tensor, lr: float, scale: float | Tensor | None = None
    ) -> Iterator[None]:
        """Wrap one training step's forward and backward pass (before ``optimizer.step()``).

        ``ids``: the training-example ids of the batch, in the batch's order; ``lr``: the step's
        learning rate (a window keeps its first step's, the weight of its checkpoint in
        :class:`~influencer.index.checkpoints.CheckpointStores`); ``scale``: this step's
        ``loss_scale`` (a number or one per example), instead of the settings' rule.
        """
        try:
            self._begin_step()
            yield from self._step(ids, lr, scale)
        except BaseException:
            self._spare.restore()  # a failed step: the training loop may not call the store again
            raise

    def skip_step(self) -> None:
        """Count a training step outside every window (:attr:`collecting` False) without wrapping
        its passes in :meth:`step`, and do what :meth:`step` does for it: raise a closed window's
        failed write, spare a core while the writer works (a training loop that calls neither
        would keep one thread fewer until :meth:`flush` or :meth:`finish`)."""
        if self.collecting:
            raise IndexStoreError(
                f"step {self.steps} is in the window of a checkpoint: wrap its forward and backward "
                "pass in store.step()"
            )
        self._begin_step()
        self.steps += 1

    def _begin_step(self) -> None:
        """What every step starts with: training on one thread fewer while the writer works
        (``spare_core``), and a closed window's failure (rows not finite, files not written) raised."""
        self._spare.update(any(not future.done() for future, _ in self._writes))
        if self._writes:
            self._raise_failed(wait=False)

    def _step(self, ids: Sequence[int] | Tensor, lr: float, scale: float | Tensor | None) -> Iterator[None]:
        """:meth:`step`'s body after :meth:`_begin_step` (a generator, delegated to)."""
        step = self.steps
        opens = step in self.settings.checkpoints
        if self.window is None and not opens:
            self.steps += 1
            yield
            return
        idx, at = self._batch_ids(ids, len(self.train))  # before a window opens: a bad step is no step
        if opens:
            if self.window is not None:
                raise IndexStoreError(
                    f"checkpoint step {step} opens a window while the one of step {self.window.step} has "
                    f"seen {self.window.count} of {self.window.influence.n} examples; space the "
                    "checkpoints at least one epoch apart"
                )
            window = _Window(self, step, lr)
            if window.done:
                self.written.append(window.layout.root)
            else:
                self.window = window
        window = self.window
        if window is None:
            self.steps += 1
            yield
            return
        hooks = window.hooks
        # held (projected later with other steps) when the last step fits a group's buffers (half
        # of hold_mb); never the first window's first step, which is checked now
        hooks.start(len(idx), hold=self.checked and 0 < self._step_bytes <= self.buffers.budget)
        try:
            yield
        finally:
            hooks.active = False
        self.steps += 1
        fn = window.influence.fn
        taken = hooks.take()
        self._step_bytes = hooks.bytes
        factor = self._device_scale(idx, scale, fn.device, fn.dtype)
        window.add(idx, at, taken, factor)
        if not self.checked:  # the rows as the window keeps them, scaled as it will
            # of the batch's first examples: a wrong loss scale or a training-mode difference shows
            # in every row, and a post-hoc pass over a few costs a fraction of one over the batch
            few = idx[:_CHECKED]
            on = few.to(fn.device)
            rows = window.rows[on] * window.scales[on] + window.regularizer
            self._check(window, few, rows, step, hooks.reduced)
        if window.complete:
            window.close_group()
        if window.held:  # closed groups: the window's last, or one full
            stream = torch.cuda.current_stream(fn.device) if fn.device.type == "cuda" else None
            self._submit(functools.partial(window.project, window.take_held(), stream), window.layout.root)
        if window.complete:
            hooks.remove()
            self._submit(window.finished, window.layout.root)
            self.written.append(window.layout.root)
            self.window = None

    def _batch_ids(self, ids: Sequence[int] | Tensor, n: int) -> tuple[Tensor, list[int]]:
        """A step's ids as a 1-D int64 tensor and as a list, checked to lie in ``[0, n)``."""
        if not (isinstance(ids, Tensor) and ids.dtype == torch.int64 and ids.ndim == 1 and not ids.is_cuda):
            ids = self.train.check_indices(ids)  # converted and checked
            return ids, ids.tolist()
        at = ids.tolist()  # (the checks in Python: a torch or numpy call costs more between kernels)
        if at and (min(at) < 0 or max(at) >= n):
            raise DataError(f"ids must lie in [0, {n}); got range [{min(at)}, {max(at)}]")
        return ids, at

    def _submit(self, job: Callable[[], None], root: Path) -> None:
        """Run a window's job (projecting held steps; finishing it: its rows, their check, its
        files) in the writer thread, in order; an earlier failed one is raised."""
        self._raise_failed(wait=False)
        if self._writer is None:
            self._writer = background_pool("training-store")
        self._writes.append((self._writer.submit(job), root))

    def _raise_failed(self, wait: bool) -> None:
        """Drop finished writes (all of them, waiting, with ``wait``); raise the first that failed,
        once (it is dropped too, and its store taken off :attr:`written`)."""
        pending: list[tuple[Future[None], Path]] = []
        try:
            while self._writes:
                future, root = self._writes.pop(0)
                if wait or future.done():
                    if future.exception() is not None and root in self.written:
                        self.written.remove(root)
                    future.result()
                else:
                    pending.append((future, root))
        finally:
            self._writes = pending + self._writes

    def _device_scale(
        self, ids: Tensor, given: float | Tensor | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """:meth:`_scale` ``(B or 1, 1)`` on the rows' device and dtype; for a fixed rule ("mean",
        "sum", a number) made once per batch size, not at every step."""
        scale = self.settings.loss_scale if given is None else given
        key = (scale, len(ids), device, dtype) if isinstance(scale, (str, int, float)) else None
        if key is not None and key in self._scales:
            return self._scales[key]
        value = self._scale(ids, given).reshape(-1, 1).to(device, dtype)
        if key is not None:
            self._scales[key] = value
        return value

    def _scale(self, ids: Tensor, given: float | Tensor | None) -> Tensor:
        """The factor turning the step's output gradients into those of the per-example losses."""
        scale = self.settings.loss_scale if given is None else given
        if isinstance(scale, Tensor):
            value: Any = scale.detach().cpu()
        elif scale == "mean":
            value = float(len(ids))
        elif scale == "sum":
            value = 1.0
        elif callable(scale):
            value = scale(ids)
        else:
            value = float(scale)
        value = torch.as_tensor(value, dtype=torch.float64)
        if value.ndim == 0:
            return value.reshape(1, 1, 1)
        if value.shape != (len(ids),):
            raise ConfigError(
                f"loss_scale returned shape {tuple(value.shape)} for a batch of {len(ids)}; return one "
                "number or one per example"
            )
        return value.reshape(-1, 1, 1)

    def _check(
        self, window: _Window, ids: Tensor, rows: Tensor, step: int, reduced: torch.dtype | None = None
    ) -> None:
        """The window's first batch against a post-hoc projection at the same parameters (to the
        rounding of ``reduced``, a lower precision the step computed in)."""
        inf = window.influence
        fn = inf.fn
        theta = torch.cat([p.detach().reshape(-1) for p in _chosen(self.model, fn.names)]).to(fn.dtype)
        if not torch.equal(theta, inf.theta):
            return  # the step changed the parameters before the window saw it: nothing to compare
        reference = torch.cat(
            [
                window.projection.gradients(fn, inf.theta, fn.prepare(batch), "loss")
                for _, batch in inf.train.chunks(inf.batch_size, ids)
            ]
        )
        err = float((rows - reference).norm() / (reference.norm() + 1e-30))
        tol = 1e-4 if fn.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        # a step in half precision (autocast): its rounding, carried through a few layers
        tol = max(tol, _HALF_TOLERANCE.get(reduced, 0.0))
        if err > tol:
            rounding = "" if reduced is None else f", up to {reduced} rounding"
            raise ConfigError(
                f"the gradients collected at step {step} differ from the task's per-example loss gradients "
                f"(relative error {err:.2g}): the loss training backpropagates must be the task's loss "
                "reduced as TrainingStoreSettings.loss_scale says (default 'mean' over the batch), and the "
                "model must compute the same in training mode as in evaluation mode (dropout, batch "
                f"normalisation){rounding}; fix the loss_scale, or pass check=False to keep the "
                "training-mode gradients"
            )
        self.checked = True

    def flush(self) -> None:
        """Wait until the stores of closed windows are written (their files are written in a thread
        beside training); raise the first that could not be."""
        try:
            self._raise_failed(wait=True)
        finally:
            self._spare.restore()

    def finish(self) -> list[Path]:
        """The stores written, once their files are; raises if a window is still open (it did not
        see every example) or a store could not be written."""
        try:
            self._raise_failed(wait=True)
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self.buffers.clear()
            self._spare.restore()
        if self.window is not None:
            w = self.window
            w.hooks.remove()
            raise IndexStoreError(
                f"the window of checkpoint step {w.step} saw {w.count} of {w.influence.n} training "
                f"examples before training ended; its store in {w.layout.root} is unfinished. Open the "
                "checkpoint at least one epoch before the end, or feed every example in the epoch"
            )
        return list(self.written)


def _chosen(model: nn.Module, names: Sequence[str]) -> list[Tensor]:
    named = dict(model.named_parameters())
    return [named[n] for n in names]


def _floating_state(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The model's floating parameters, then its floating buffers, by name."""
    items = [*model.named_parameters(), *model.named_buffers()]
    return [(n, t) for n, t in items if t.is_floating_point()]


def model_state(model: nn.Module) -> tuple[list[str], Tensor]:
    """Names and one float64 vector of every floating parameter and buffer (what training changes)."""
    items = _floating_state(model)
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for _, t in items])
    return [n for n, _ in items], flat


def load_model_state(model: nn.Module, path: str | Path) -> None:
    """Copy the state a training-time store was collected at into ``model`` (same architecture)."""
    names, flat = stored_state(path)
    items = _floating_state(model)
    if [n for n, _ in items] != names or sum(t.numel() for _, t in items) != flat.numel():
        raise IndexStoreError(
            f"the model's parameters and buffers differ from those the store in {path} was collected "
            "with (names or sizes); pass the model that was trained"
        )
    with torch.no_grad():
        for (_, t), part in zip(items, torch.split(flat, [t.numel() for _, t in items]), strict=True):
            t.copy_(part.view_as(t).to(t.device, t.dtype))


def stored_state(path: str | Path) -> tuple[list[str], Tensor]:
    """The names and float64 values of the model state a training-time store was collected at."""
    from influencer._kernel.files import file_sha256

    layout = StoreLayout(path)
    manifest = layout.read_manifest()
    record = manifest.get("parameters") if manifest is not None else None
    if not isinstance(record, dict):
        raise IndexStoreError(
            f"{layout.root} is not a store collected during training (its manifest has no parameters); "
            "open it with GradientIndex.open and the model at its checkpoint"
        )
    file = layout.root / record["file"]
    if not file.exists() or file_sha256(file) != record["sha256"]:
        raise IndexStoreError(f"{file} is missing or damaged; collect the store again")
    return list(record["names"]), torch.from_numpy(np.load(file, allow_pickle=False))
