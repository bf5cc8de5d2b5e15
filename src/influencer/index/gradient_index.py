"""A gradient index: projected training gradients on disk, queried for top-k influence in a stream.

Usage::

    inf = Influence(model, task, train)                       # no fit() needed for the index itself
    index = GradientIndex.build(inf, "runs/index", projector=KroneckerProjector(k_in=32, k_out=32))
    top = index.top_k(test, k=10)                             # TopK: (m, 10) ids and scores
    s = index.scores(test[:5])                                # (5, n), dense, for small queries

    index = GradientIndex.open("runs/index", inf)             # later: refuses a changed model/data

Build once: every training example's gradient ``g_i = grad(loss_i + Omega)`` is projected to ``k``
dimensions (:mod:`influencer.index.projectors`, :mod:`influencer.index.kronecker`) and streamed
to disk in chunks (:mod:`influencer.index.store`), together with the projected Fisher
``(1/n) sum_i Pg_i Pg_i^T``. Query many times: a test example's direction ``d`` (see
:mod:`influencer.index.preconditioners`) is dotted with the stored rows chunk by chunk, and the
scores are reduced to running top-k lists, so the ``m x n`` score matrix is never formed.

Scores follow the library's convention (:mod:`influencer._kernel.scores`): ``score = d . Pg_i /
n``, the predicted change of the test measurement if training example ``i`` were removed;
positive = helpful, negative = harmful. With ``IdentityProjector`` they equal
:class:`~influencer.Influence`'s scores for the matching estimator.

With ``Influence(..., distributed=True)`` in a ``torch.distributed`` process group, each rank
builds a contiguous block of chunks into the shared directory (rank 0 commits the manifest after a
barrier), and each rank scans its block of chunks in a query; candidates are gathered and merged,
so every rank returns the single-process result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from influencer._kernel.data import Examples
from influencer._kernel.distributed import all_gather_blocks, all_reduce_sum, barrier, rank_and_size, shard
from influencer._kernel.errors import ConfigError, NonFiniteError
from influencer._kernel.files import atomic_save_array, json_roundtrip
from influencer._kernel.fingerprint import hash_examples, hash_json
from influencer._kernel.gram import gram
from influencer._kernel.progress import progress_bar
from influencer._kernel.scores import TopK, removal_scores
from influencer._kernel.threads import background_pool
from influencer.index.preconditioners import Preconditioner, ProjectedFisher
from influencer.index.projectors import GaussianProjector, Projection, Projector
from influencer.index.registry import projector_from_settings
from influencer.index.results import QueryResult
from influencer.index.store import (
    FORMAT,
    VERSION,
    ChunkWriter,
    IndexStoreError,
    StoreLayout,
    load_basis,
    mismatch,
)
from influencer.index.topk import RunningTopK, concat_rows, merge_ranked
from influencer.influence import Influence

_GROUP_BYTES = 64 << 20  # test directions and one score block of a top-k pass over the chunks
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


class _Slice(Examples):
    """Examples ``start .. stop`` of another set (test blocks without copying the test set)."""

    def __init__(self, data: Examples, start: int, stop: int) -> None:
        self.data, self.start, self.stop = data, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def take(self, indices: Tensor) -> Any:
        return self.data.take(indices + self.start)


def _check_finite(rows: Tensor, ids: Tensor, what: str) -> None:
    # a row's sum is NaN or infinite if any entry is (one reduction instead of a (B, k) mask); only
    # then, or when a sum of finite entries overflows, are the entries looked at
    if bool(torch.isfinite(rows.sum(dim=1)).all()):
        return
    bad = ~torch.isfinite(rows).all(dim=1)
    if bad.any():
        raise NonFiniteError(
            f"the {what} gradient is NaN or infinite for example(s) {ids[bad.cpu()][:10].tolist()}: check "
            "those inputs, the loss (e.g. log of 0) and the model's weights; use float64 if it overflows"
        )


class GradientIndex:
    """Projected training gradients of an :class:`~influencer.Influence`, stored on disk.

    Create with :meth:`build` (or :meth:`open` an existing store); see the module docstring.
    """

    def __init__(
        self,
        influence: Influence,
        layout: StoreLayout,
        manifest: dict[str, Any],
        projection: Projection,
        verify: bool = True,
    ) -> None:
        self.influence = influence
        self.verify = verify
        self.layout = layout
        self.manifest = manifest
        self.projection = projection
        self.cache: dict[Any, Any] = {}  # preconditioners' factorisations, computed once per index
        self._maps: dict[int, np.ndarray] = {}

    # ---- facts ----------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.layout.root

    @property
    def header(self) -> dict[str, Any]:
        """What the store was built from: fingerprint, projector, ``n``, ``p``, ``k``, chunk size."""
        return self.manifest["header"]

    @property
    def n(self) -> int:
        return int(self.header["n"])

    @property
    def k(self) -> int:
        """Projected dimension."""
        return int(self.header["k"])

    @property
    def chunk(self) -> int:
        return int(self.header["chunk"])

    @property
    def num_chunks(self) -> int:
        return -(-self.n // self.chunk)

    @property
    def fingerprint(self) -> str:
        """sha256 of the header: identifies the stored gradients (used by query checkpoints)."""
        return hash_json(self.header)

    # ---- build ----------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        influence: Influence,
        path: str | Path,
        projector: Projector | None = None,
        *,
        chunk: int = 2048,
        fisher: bool | str = "layers",
        fisher_dtype: torch.dtype | None = None,
        overwrite: bool = False,
        progress: bool | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> GradientIndex:
        """Project every training gradient and store it in ``path``; resume an interrupted build.

        Args:
            influence: the model, task and training data (need not be fitted).
            path: store directory (created; a directory holding an unrelated index is refused).
            projector: default ``GaussianProjector(k=1024)``; see :mod:`influencer.index.projectors`.
            chunk: training examples per stored chunk (the unit of resumption and of query I/O;
                gradients are computed ``influence.batch_size`` at a time).
            fisher: also accumulate the projected Fisher for :class:`ProjectedFisher`: ``"layers"``
                (default) only its diagonal blocks over the projection's layers (what the default
                ``ProjectedFisher(blocks="layers")`` uses; ``sum_l k_l^2`` instead of ``k^2`` entries
                per example, which at ``k`` of thousands is most of a build's time), ``"full"`` (or
                ``True``) the whole ``(k, k)`` matrix, ``False`` none.
            fisher_dtype: the dtype of the Fisher's products (default: the store's accumulation
                dtype, float32 or float64). ``torch.bfloat16`` rounds each chunk's rows and its
                block products to bfloat16 before they are summed in float64: faster on CPUs with
                AVX512-BF16 (and on GPUs), the Fisher to about three digits, which a damped
                preconditioner does not notice (the LDS in ``benchmarks/README.md``). Recorded in
                the store's header when given.
            overwrite: rebuild a store that was built from other inputs instead of refusing.
            progress: progress bar (default: the influence's setting).
            on_chunk: called with each newly written chunk's index.

        A store built from the same inputs is reused (only missing chunks are computed), so calling
        ``build`` again after a crash resumes it.
        """
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ConfigError(f"chunk must be a positive integer (training examples per file), got {chunk!r}")
        fisher = fisher_setting(fisher)
        fisher_dtype = check_product_dtype("fisher_dtype", fisher_dtype)
        if fisher_dtype is not None and not fisher:
            raise ConfigError(
                "fisher_dtype is the dtype of the Fisher's products: it needs fisher='layers' or 'full'"
            )
        projector = GaussianProjector() if projector is None else projector
        if not isinstance(projector, Projector):
            raise ConfigError(
                f"projector must be an influencer.index Projector, got {type(projector).__name__}"
            )
        fn = influence.fn
        projection = projector.bind(fn)
        layout = StoreLayout(path)
        header = json_roundtrip(
            {
                "fingerprint": influence.settings()["gradients"],
                "projector": projector.settings(),
                "projection": projection.info,
                "n": influence.n,
                "p": influence.p,
                "k": projection.k,
                "chunk": chunk,
                "fisher": fisher,
                # only when given, so that the headers of default builds stay as they were
                **({"fisher_dtype": dtype_name(fisher_dtype)} if fisher_dtype is not None else {}),
            }
        )
        distributed = influence.distributed
        rank = rank_and_size()[0] if distributed else 0
        n, k, dtype = influence.n, projection.k, projector.dtype
        count = -(-n // chunk)
        bounds = [(j * chunk, min(chunk, n - j * chunk)) for j in range(count)]

        # Every rank reads the old state before anyone writes, so all take the same decision.
        layout.check_empty_or_index()
        layout.check_writable()
        old = layout.read_manifest()
        if old is not None and old["header"] != header:
            if not overwrite:
                changes = mismatch(old["header"], header)
                raise IndexStoreError(
                    f"{layout.root} holds an index built from other inputs ({changes}); "
                    "pass overwrite=True (CLI: --overwrite) to rebuild it, or choose another directory"
                )
            old = None
        fresh_basis = False
        if projection.needs_fit:
            stored = load_basis(layout, old.get("basis")) if old is not None else None
            if stored is None:
                old = None  # chunks projected with another (or a lost) basis are not reused
                projection.fit(influence)
                fresh_basis = True
            else:
                projection.load_state(torch.from_numpy(stored))
        known = {}
        if old is not None:
            for record in old.get("chunks", []):
                j = record["first"] // chunk
                if layout.chunk_is_intact(j, record, k, dtype):
                    known[j] = record
        if (
            old is not None
            and old["status"] == "complete"
            and len(known) == count
            and (layout.fisher_path.exists() or not fisher)
            and layout.regularizer_path.exists()
        ):
            return cls(influence, layout, old, projection)
        barrier()
        building = {
            "format": FORMAT,
            "version": VERSION,
            "status": "building",
            "header": header,
            "chunks": [known[j] for j in sorted(known)],
        }
        if projection.needs_fit:
            building["basis"] = old["basis"] if old is not None else None
        if rank == 0:
            layout.remove_stale_temporaries()  # an interrupted writer's half-written files
            if old is None:
                layout.clear()
                layout.check_writable()
            if fresh_basis:
                state = projection.state().numpy()
                building["basis"] = {
                    "file": layout.basis_path.name,
                    "sha256": atomic_save_array(layout.basis_path, state),
                }
            layout.write_manifest(building)
        barrier()

        mine = torch.arange(count)
        if distributed:
            mine = shard(mine)
        show = influence.progress if progress is None else progress
        accumulate = torch.float64 if dtype == "float64" else torch.float32
        total = torch.zeros(k, k, dtype=torch.float64, device=fn.device) if fisher else None
        spans = fisher_spans(projection, fisher)
        bar = progress_bar(mine.tolist(), "index: projecting gradients", show, total=len(mine), unit="chunk")
        with ChunkWriter(layout, on_chunk) as writer:
            # the chunks' rows computed in turn into depth + 1 buffers: one is being written while
            # the next is filled, and memory written for the first time costs a page fault per page
            buffers: list[Tensor | None] = [None] * (writer.depth + 1)
            for i, j in enumerate(bar):
                first, rows = bounds[j]
                record = known.get(j) or layout.chunk_record(j, first, rows, k, dtype)
                if record is None:
                    slot = i % len(buffers)
                    x = cls._project_chunk(influence, projection, first, rows, buffers[slot])
                    buffers[slot] = x  # (a shorter last chunk's is not reused: _project_chunk checks)
                    stored = x.to(_TORCH_DTYPES[dtype]).cpu().numpy()
                    writer.submit(j, stored, first)  # written while the next chunk is computed
                else:
                    stored = layout.load_chunk(j)
                if total is not None:
                    # From the stored values, so a resumed build accumulates exactly what a fresh one
                    # does (a fresh chunk's array is shared, not copied; a memory-mapped one is read-only).
                    x = torch.from_numpy(stored if stored.flags.writeable else np.array(stored))
                    add_fisher(total, x.to(fn.device, fisher_dtype or accumulate), spans)
        if total is not None and distributed:
            all_reduce_sum(total)
        barrier()

        if rank == 0:
            cls._commit(influence, layout, projection, building, bounds, known, total)
        barrier()
        manifest = layout.read_manifest()
        assert manifest is not None and manifest["status"] == "complete"
        return cls(influence, layout, manifest, projection)

    @staticmethod
    def _project_chunk(
        influence: Influence, projection: Projection, first: int, rows: int, buffer: Tensor | None = None
    ) -> Tensor:
        """Projected objective gradients ``(rows, k)`` of training ids ``first .. first + rows``, in
        ``buffer`` (an earlier chunk's rows, no longer needed) when it has their shape."""
        fn = influence.fn
        ids = torch.arange(first, first + rows)
        out = buffer if buffer is not None and buffer.shape[0] == rows else None
        for idx, batch in influence.train.chunks(influence.batch_size, ids):
            # the chunk's rows in place (after its first batch, which sets their dtype), instead of
            # concatenating its batches or copying each: fresh memory is slow to write once more
            part = None if out is None else out[idx[0] - first : idx[-1] + 1 - first]
            x = projection.gradients(fn, influence.theta, fn.prepare(batch), "loss", out=part)
            _check_finite(x, idx, "training-loss")
            if out is None:
                out = x.new_empty(rows, x.shape[1])
                out[: len(idx)] = x
        assert out is not None
        return out

    @staticmethod
    def _commit(
        influence: Influence,
        layout: StoreLayout,
        projection: Projection,
        manifest: dict[str, Any],
        bounds: list[tuple[int, int]],
        known: dict[int, dict[str, Any]],
        total: Tensor | None,
    ) -> None:
        header = manifest["header"]
        dtype = header["projector"]["dtype"]
        records = []
        for j, (first, rows) in enumerate(bounds):
            # (the chunks were read back and verified, or written, by this build: shape checks suffice)
            record = known.get(j) or layout.chunk_record(j, first, rows, header["k"], dtype, verify=False)
            if record is None:
                raise IndexStoreError(
                    f"chunk {j} of {layout.root} is missing after the build (did a rank fail?); run "
                    "the build again to compute it"
                )
            records.append(record)
        files = {}
        if total is not None:
            fisher = (total / influence.n).cpu().numpy()
            sha = atomic_save_array(layout.fisher_path, fisher)
            files["fisher"] = {"file": layout.fisher_path.name, "sha256": sha}
        reg_grad = influence.fn.regularizer_grad(influence.theta)
        reg = projection.project(reg_grad[None])[0].double().cpu().numpy()
        files["regularizer"] = {
            "file": layout.regularizer_path.name,
            "sha256": atomic_save_array(layout.regularizer_path, reg),
        }
        layout.write_manifest({**manifest, "status": "complete", "chunks": records, **files})
        layout.remove_records(len(bounds))

    # ---- open -----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | Path, influence: Influence, projector: Projector | None = None, verify: bool = True
    ) -> GradientIndex:
        """Open a built store for ``influence``'s model and data; refuse it if they changed.

        ``projector`` is needed only for a projector kind this library does not define (else it
        is rebuilt from the manifest). Opening checks every file's presence and shape. With
        ``verify`` (the default) every chunk is also verified as it is read by a query, ``scores``,
        ``gradients`` or ``self_influence``: its sha256, taken over the bytes read, must equal the one
        recorded at build time and its values must be finite, else an :class:`IndexStoreError`
        names the chunk. ``verify=False`` reads chunks memory-mapped and unchecked (a damaged chunk
        is then scored as it reads).
        """
        layout = StoreLayout(path)
        manifest = layout.read_manifest()
        if manifest is None:
            raise IndexStoreError(
                f"{layout.root} holds no gradient index (no manifest.json); build one with "
                "GradientIndex.build(influence, path) (CLI: influencer index --out DIR)"
            )
        header = manifest["header"]
        if manifest["status"] != "complete":
            count = -(-int(header["n"]) // int(header["chunk"]))
            done = len(list((layout.root / "chunks").glob("*.json")))
            raise IndexStoreError(
                f"the index in {layout.root} is unfinished ({done} of {count} chunks); resume it with "
                "GradientIndex.build(influence, path, ...) and the same settings"
            )
        current = json_roundtrip(influence.settings()["gradients"])
        if header["fingerprint"] != current:
            raise IndexStoreError(
                f"the index in {layout.root} was built for another model, data or task "
                f"({mismatch(header['fingerprint'], current)}); rebuild it with "
                "GradientIndex.build(influence, path, overwrite=True)"
            )
        projector = projector_from_settings(header["projector"]) if projector is None else projector
        given = json_roundtrip(projector.settings())
        if given != header["projector"]:
            raise IndexStoreError(
                f"the index in {layout.root} was built with another projector "
                f"({mismatch(header['projector'], given)}); pass that projector or rebuild the index"
            )
        projection = projector.bind(influence.fn)
        if projection.needs_fit:
            stored = load_basis(layout, manifest.get("basis"))
            if stored is None:
                raise IndexStoreError(
                    f"the projection basis of the index in {layout.root} (basis.npy) is missing or damaged; "
                    "rebuild it with GradientIndex.build(influence, path, overwrite=True)"
                )
            projection.load_state(torch.from_numpy(stored))
        index = cls(influence, layout, manifest, projection, verify=verify)
        if len(manifest.get("chunks", [])) != index.num_chunks:
            raise IndexStoreError(
                f"the manifest of {layout.root} lists {len(manifest.get('chunks', []))} chunks, not "
                f"{index.num_chunks}; it is damaged: rebuild it with GradientIndex.build(..., overwrite=True)"
            )
        for j, record in enumerate(manifest["chunks"]):
            if not layout.chunk_is_valid(j, record["rows"], index.k, header["projector"]["dtype"]):
                raise IndexStoreError(
                    f"chunk {j} of the index in {layout.root} is missing or damaged; run "
                    "GradientIndex.build(influence, path, ...) with the same settings to recompute it"
                )
        return index

    # ---- stored and test gradients --------------------------------------------------------------

    def _rows(self, j: int) -> Tensor:
        """Stored chunk ``j`` ``(rows, k)`` on the influence's device and in its dtype."""
        fn = self.influence.fn
        if self.verify:  # read into memory once, its sha256 and finiteness checked on that copy
            record = self.manifest["chunks"][j]
            rows = self.layout.read_chunk(j, record, self.k, self.header["projector"]["dtype"])
            return torch.from_numpy(rows).to(fn.device, fn.dtype)
        if j not in self._maps:  # opening a memory map costs a file open and a header parse
            self._maps[j] = self.layout.load_chunk(j)
        rows = np.array(self._maps[j])  # a writable copy of the chunk, read from the map
        return torch.from_numpy(rows).to(fn.device, fn.dtype)

    def _ids(self, j: int) -> Tensor:
        return torch.arange(j * self.chunk, min((j + 1) * self.chunk, self.n))

    def _my_chunks(self) -> list[int]:
        chunks = torch.arange(self.num_chunks)
        return (shard(chunks) if self.influence.distributed else chunks).tolist()

    def gradients(self, indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Stored projected gradients ``Pg_i`` ``(c, k)`` of training ids (default all), in that order."""
        idx = self.influence.train.check_indices(indices)
        out = torch.empty(len(idx), self.k, dtype=self.influence.fn.dtype, device=self.influence.device)
        owner = idx // self.chunk
        for j in torch.unique(owner).tolist():
            at = (owner == j).nonzero().flatten()
            out[at.to(out.device)] = self._rows(j)[(idx[at] - j * self.chunk).to(out.device)]
        return out

    def test_gradients(self, test: Any) -> Tensor:
        """Projected test-measurement gradients ``P grad f(z)`` ``(m, k)``."""
        inf = self.influence
        ex = inf.examples(test)
        parts = []
        for ids, batch in ex.chunks(inf.batch_size):
            x = self.projection.gradients(inf.fn, inf.theta, inf.fn.prepare(batch), "measurement")
            _check_finite(x, ids, "measurement")
            parts.append(x)
        return torch.cat(parts)

    def regularizer(self) -> Tensor:
        """``P grad Omega(theta)`` ``(k,)``, the part of every stored ``Pg_i`` that is not the loss's."""
        path = self.layout.regularizer_path
        if self.verify:
            reg = self.layout.read_array(path, self.manifest.get("regularizer", {}).get("sha256"))
        else:
            reg = np.load(path, allow_pickle=False)
        return torch.from_numpy(reg).to(self.influence.device, self.influence.fn.dtype)

    def fisher(self) -> Tensor:
        """The projected Fisher ``(1/n) sum_i Pg_i Pg_i^T`` ``(k, k)`` float64.

        An index built with ``fisher="layers"`` holds only the diagonal blocks of its projection's
        layers (:attr:`fisher_kind`); the entries between layers are zero.
        """
        if not self.header["fisher"]:
            raise ConfigError(
                "this index was built with fisher=False, so it has no projected Fisher; rebuild it with "
                "fisher='layers' or 'full', or query with NoPreconditioner() or EstimatorPreconditioner()"
            )
        path = self.layout.fisher_path
        if self.verify:
            f = self.layout.read_array(path, self.manifest.get("fisher", {}).get("sha256"))
        else:
            f = np.load(path, allow_pickle=False)
        return torch.from_numpy(f).to(self.influence.device)

    @property
    def fisher_kind(self) -> str | None:
        """Which projected Fisher the index holds: ``"layers"``, ``"full"`` or ``None``."""
        kind = self.header["fisher"]
        return "full" if kind is True else kind or None

    # ---- queries --------------------------------------------------------------------------------

    def _test_blocks(self, test: Any, block: int) -> tuple[Examples, list[tuple[int, int]]]:
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ConfigError(f"block must be a positive integer (test examples per block), got {block!r}")
        ex = self.influence.examples(test)
        m = len(ex)
        return ex, [(s, min(s + block, m)) for s in range(0, m, block)]

    def _stream(
        self,
        directions: Tensor,
        progress: Iterator[int] | None = None,
        score_dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(ids, scores (m, c))`` for this rank's chunks, in id order (products in ``score_dtype``).

        The next chunk is read, verified (its sha256, its finiteness) and converted to
        ``score_dtype`` in a thread while this one is scored: those release the interpreter, so
        they overlap the products.
        """
        chunks = self._my_chunks()

        def read(j: int) -> Tensor:  # (in the score products' dtype already)
            rows = self._rows(j)
            return rows if score_dtype is None else rows.to(score_dtype)

        with background_pool("index-read") as reader:
            ahead = reader.submit(read, chunks[0]) if chunks else None
            for i, j in enumerate(chunks):
                assert ahead is not None
                rows = ahead.result()  # a damaged chunk's error is raised here, in its turn
                ahead = reader.submit(read, chunks[i + 1]) if i + 1 < len(chunks) else None
                yield self._ids(j), low_precision_scores(directions, rows, self.n, score_dtype)
                if progress is not None:
                    next(progress, None)

    def scores(
        self,
        test: Any,
        train_indices: Sequence[int] | Tensor | None = None,
        preconditioner: Preconditioner | None = None,
        block: int = 256,
        score_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Scores ``(m, c)`` of training ids (default all) on each test example; positive = helpful.

        ``score_dtype``: as for :meth:`top_k`.
        """
        score_dtype = check_score_dtype(score_dtype)
        pre = ProjectedFisher() if preconditioner is None else preconditioner
        ex, blocks = self._test_blocks(test, block)
        out = []
        for start, stop in blocks:
            d = pre.directions(self, _Slice(ex, start, stop))
            if train_indices is not None:
                out.append(low_precision_scores(d, self.gradients(train_indices), self.n, score_dtype))
                continue
            cols = [s for _, s in self._stream(d, score_dtype=score_dtype)]
            local = torch.cat(cols, 1) if cols else d.new_zeros(d.shape[0], 0)
            out.append(all_gather_blocks(local, dim=1) if self.influence.distributed else local)
        return torch.cat(out)

    def top_k(
        self,
        test: Any,
        k: int = 10,
        *,
        block: int = 256,
        preconditioner: Preconditioner | None = None,
        checkpoint: str | Path | None = None,
        overwrite: bool = False,
        progress: bool | None = None,
        on_block: Callable[[int], None] | None = None,
        score_dtype: torch.dtype | None = None,
    ) -> TopK:
        """The ``k`` most helpful and most harmful training examples per test example, streamed.

        Memory stays at ``O(m k)`` plus one score block, whatever ``n``: consecutive test blocks
        are scored together in one pass over the chunks, as many as keep their directions and
        score block within 64 MiB (each chunk is then read and verified once per pass).

        Args:
            test: test data shaped like the training data, ``m`` examples.
            k: list length (at most ``n``).
            block: test examples per block (the unit of checkpointing).
            preconditioner: default ``ProjectedFisher()``; see :mod:`influencer.index.preconditioners`.
            checkpoint: directory where finished test blocks are kept (:class:`QueryResult`); a
                query interrupted there resumes from its last finished block.
            overwrite: replace another query's results in ``checkpoint`` instead of refusing.
            progress: progress bar (default: the influence's setting).
            on_block: called with each newly finished test block's index.
            score_dtype: the dtype of the score products (default: the influence's).
                ``torch.bfloat16`` rounds the test directions and the stored rows to bfloat16 and
                multiplies them there: about 2.7x faster on a CPU with AVX512-BF16 (and on GPUs'
                tensor cores), each score then carrying about 3 significant digits (relative
                rounding up to 2^-8 of the score's largest terms), far below what the projection
                itself changes; ties this rounding makes are ordered by training id as always.

        Returns:
            :class:`~influencer.TopK`, ``(m, k)`` each: helpful ids/scores (largest score first),
            harmful ids/scores (most negative first); equal scores are ordered by training id.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k must be a positive integer (training examples per list), got {k!r}")
        kk = min(k, self.n)
        score_dtype = check_score_dtype(score_dtype)
        pre = ProjectedFisher() if preconditioner is None else preconditioner
        ex, blocks = self._test_blocks(test, block)
        distributed = self.influence.distributed
        rank = rank_and_size()[0] if distributed else 0
        results = None
        if checkpoint is not None:
            settings = {
                "index": self.fingerprint,
                "preconditioner": pre.settings(self),
                "test": hash_examples(ex),
                "m": len(ex),
                "k": kk,
                "block": block,
            }
            if score_dtype is not None:  # the settings of a default query stay as they were
                settings["score_dtype"] = dtype_name(score_dtype)
            results = QueryResult.create_or_resume(checkpoint, settings, overwrite, write=rank == 0)
            barrier()
        todo = [b for b in range(len(blocks)) if results is None or results.load_block(b) is None]
        groups = self._groups(todo, blocks)
        show = self.influence.progress if progress is None else progress
        work = len(groups) * len(self._my_chunks())
        steps = iter(progress_bar(range(work), "index: top-k", show, total=work, unit="chunk"))
        parts: dict[int, TopK] = {}
        for b in range(len(blocks)):
            if b not in todo:
                assert results is not None
                part = results.load_block(b)
                assert part is not None
                parts[b] = part
        for group in groups:
            # every block of the group against each chunk as it is read: a chunk is read (and
            # verified) once per group, not once per block
            d = torch.cat([pre.directions(self, _Slice(ex, *blocks[b])) for b in group])
            running = RunningTopK(d.shape[0], kk, d.dtype, d.device)
            for ids, s in self._stream(d, steps, score_dtype):
                running.add(s, ids)
            whole = running.result()
            if distributed:
                whole = merge_ranked(self._gather(whole), kk)
            first = blocks[group[0]][0]
            for b in group:
                rows = slice(blocks[b][0] - first, blocks[b][1] - first)
                part = TopK(*(getattr(whole, f)[rows].cpu() for f in TopK.__dataclass_fields__))
                if results is not None and rank == 0:
                    results.save_block(b, part)
                parts[b] = part
                if on_block is not None:
                    on_block(b)
        for _ in steps:  # close the bar
            pass
        return concat_rows([parts[b] for b in range(len(blocks))])

    def _groups(self, todo: list[int], blocks: list[tuple[int, int]]) -> list[list[int]]:
        """Runs of consecutive test blocks scored in one pass over the chunks, each group's
        directions ``(rows, k)`` and score block ``(rows, chunk)`` within :data:`_GROUP_BYTES`."""
        width = 8 * max(self.k, self.chunk)  # bytes per test row (float64 at most)
        groups: list[list[int]] = []
        for b in todo:
            last = groups[-1] if groups else None
            if last and last[-1] == b - 1 and (blocks[b][1] - blocks[last[0]][0]) * width <= _GROUP_BYTES:
                last.append(b)
            else:
                groups.append([b])
        return groups

    @staticmethod
    def _gather(part: TopK) -> list[TopK]:
        """Every rank's candidates, in rank order (each rank covers a later id range)."""
        width = torch.tensor([part.helpful_ids.shape[1]], device=part.helpful_ids.device)
        sizes = all_gather_blocks(width, 0)
        fields = [all_gather_blocks(getattr(part, f), dim=1) for f in TopK.__dataclass_fields__]
        out, start = [], 0
        for width in sizes.tolist():
            out.append(TopK(*(t[:, start : start + width] for t in fields)))
            start += width
        return out

    def self_influence(
        self, indices: Sequence[int] | Tensor | None = None, preconditioner: Preconditioner | None = None
    ) -> Tensor:
        """Self-influence ``(c,)``: ``(1/n) P grad loss(z_i) . M Pg_i`` from the stored gradients.

        ``M`` is the preconditioner in projected space (``ProjectedFisher`` by default, or
        ``NoPreconditioner``); ``P grad loss = Pg_i - P grad Omega``.
        """
        pre = ProjectedFisher() if preconditioner is None else preconditioner
        reg = self.regularizer()
        if indices is not None:
            x = self.gradients(indices)
            return ((x - reg) * pre.apply(self, x)).sum(1) / self.n
        parts = []
        for j in self._my_chunks():
            x = self._rows(j)
            parts.append(((x - reg) * pre.apply(self, x)).sum(1) / self.n)
        local = torch.cat(parts) if parts else reg.new_zeros(0)
        return all_gather_blocks(local, dim=0) if self.influence.distributed else local


def fisher_setting(fisher: bool | str) -> str | bool:
    """``build(fisher=...)`` as stored in the header: ``"layers"``, ``"full"`` or ``False``."""
    if fisher is True:
        return "full"
    if fisher is False or fisher is None:
        return False
    if fisher not in ("layers", "full"):
        raise ConfigError(f"fisher must be 'layers', 'full', True or False, got {fisher!r}")
    return fisher


def low_precision_scores(directions: Tensor, rows: Tensor, n: int, score_dtype: torch.dtype | None) -> Tensor:
    """:func:`removal_scores` ``(m, c)`` with the products in ``score_dtype`` (None: as given), in the
    directions' dtype."""
    if score_dtype is None:
        return removal_scores(directions, rows, n)
    # the product alone in score_dtype; back in the directions' dtype before the 1/n, which then
    # rounds no further (divided in place: the block is fresh)
    return removal_scores(directions.to(score_dtype), rows.to(score_dtype), 1).to(directions.dtype).div_(n)


def check_product_dtype(name: str, dtype: Any) -> torch.dtype | None:
    """``None`` or a floating torch dtype; anything else is refused in one line naming ``name``."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise ConfigError(f"{name} must be a floating torch dtype such as torch.bfloat16, or None; got {dtype!r}")


def check_score_dtype(dtype: Any) -> torch.dtype | None:
    """``None`` or a floating torch dtype for a query's score products."""
    return check_product_dtype("score_dtype", dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: how a dtype is written in settings and headers."""
    return str(dtype).removeprefix("torch.")


def fisher_spans(projection: Projection, fisher: str | bool) -> list[tuple[int, int]]:
    """The projected Fisher's blocks a store accumulates: the layers' diagonal blocks
    (``"layers"``), or the whole ``(k, k)`` matrix."""
    return [(a, b) for _, a, b in projection.blocks] if fisher == "layers" else [(0, projection.k)]


def add_fisher(total: Tensor, rows: Tensor, spans: list[tuple[int, int]]) -> None:
    """``total[a:b, a:b] += rows[:, a:b]^T rows[:, a:b]`` (float64) for each span; ``rows`` ``(c, k)``,
    in the dtype the products are made in."""
    for a, b in spans:
        total[a:b, a:b] += gram(rows[:, a:b]).double()
