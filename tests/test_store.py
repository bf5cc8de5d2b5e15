"""The run directory: fingerprints, atomic entries, reuse, invalidation, damage and locking."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from influencer._kernel.fingerprint import hash_examples, hash_module, hash_tensors
from influencer.app.run import store as store_module
from influencer.app.run.store import (
    MANIFEST,
    RunStore,
    StoreError,
    atomic_write_bytes,
    describe_changes,
    read_array,
)
from influencer.data import DatasetExamples, as_examples

COMPONENTS = {"model weights": "a" * 64, "training data": "b" * 64, "settings": "c" * 64}


def test_hash_tensors_sees_values_dtype_shape_and_structure():
    x = torch.arange(6.0)
    base = hash_tensors((x, torch.tensor([1, 2])))
    assert base == hash_tensors((x.clone(), torch.tensor([1, 2])))
    changed = x.clone()
    changed[3] = 3.0000002  # one float32 ulp away
    assert hash_tensors((changed, torch.tensor([1, 2]))) != base
    assert hash_tensors((x.double(), torch.tensor([1, 2]))) != base
    assert hash_tensors((x.reshape(2, 3), torch.tensor([1, 2]))) != base
    assert hash_tensors([x, torch.tensor([1, 2])]) != base  # list vs tuple
    assert hash_tensors({"x": x}) != hash_tensors({"y": x})
    assert hash_tensors(x.numpy()) == hash_tensors(x)
    assert hash_tensors(torch.ones(3, dtype=torch.bfloat16)) != hash_tensors(
        torch.ones(3, dtype=torch.float16)
    )


def test_hash_module_and_examples():
    model = torch.nn.Linear(3, 2)
    h = hash_module(model)
    with torch.no_grad():
        model.bias[0] += 1e-6
    assert hash_module(model) != h
    x, y = torch.randn(10, 3), torch.arange(10)
    assert hash_examples(as_examples((x, y))) == hash_tensors((x, y))
    # A map-style dataset is read chunk by chunk; equal data gives equal hashes.
    ds = torch.utils.data.StackDataset(x, y)
    assert hash_examples(DatasetExamples(ds), batch_size=3) == hash_examples(
        DatasetExamples(ds), batch_size=3
    )
    other = torch.utils.data.StackDataset(x, y.flip(0))
    assert hash_examples(DatasetExamples(ds)) != hash_examples(DatasetExamples(other))


def test_entries_round_trip_and_are_reused(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 5)), rng.integers(0, 9, size=7)
    with RunStore(tmp_path / "run") as store:
        s = store.section("gradients", COMPONENTS, {"damping": 0.001})
        s.save("c000000", a)
        s.save("c000001", torch.from_numpy(b))
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    entry = manifest["sections"]["gradients"]["entries"]["c000000"]
    assert entry["shape"] == [4, 5] and entry["dtype"] == "float64" and entry["file"].endswith(".npy")
    with RunStore(tmp_path / "run") as store:
        s = store.section("gradients", COMPONENTS, {"damping": 0.001})
        assert sorted(s.keys()) == ["c000000", "c000001"]
        np.testing.assert_array_equal(s.load("c000000"), a)
        np.testing.assert_array_equal(s.load("c000001"), b)
        assert s.load("c999999") is None


def test_changed_inputs_drop_entries_and_say_why(tmp_path, caplog):
    with RunStore(tmp_path) as store:
        s = store.section("directions", COMPONENTS, {"estimator": {"damping": 0.001}})
        s.save("t1", np.ones(3))
    with caplog.at_level(logging.INFO, logger="influencer"), RunStore(tmp_path) as store:
        s = store.section(
            "directions", {**COMPONENTS, "settings": "d" * 64}, {"estimator": {"damping": 0.01}}
        )
        assert len(s) == 0 and not (tmp_path / "cache" / "directions" / "t1.npy").exists()
    assert "inputs changed (settings: estimator.damping 0.001 -> 0.01)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="influencer"), RunStore(tmp_path) as store:
        s = store.section(
            "directions", {**COMPONENTS, "settings": "d" * 64}, {"estimator": {"damping": 0.01}}
        )
        s.save("t1", np.ones(3))
        changed = {**COMPONENTS, "settings": "d" * 64, "model weights": "e" * 64}
        store.section("directions", changed, {"estimator": {"damping": 0.01}})
    assert "inputs changed (model weights)" in caplog.text


def test_damaged_entry_is_dropped_and_reported(tmp_path, caplog):
    with RunStore(tmp_path) as store:
        s = store.section("gradients", COMPONENTS)
        s.save("c0", np.arange(100.0))
        path = tmp_path / s.record["entries"]["c0"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last value
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="influencer"), RunStore(tmp_path) as store:
        s = store.section("gradients", COMPONENTS)
        assert s.load("c0") is None and "c0" not in s
    assert "does not match the recorded checksum" in caplog.text
    with RunStore(tmp_path) as store:  # the manifest forgot it for good
        assert "c0" not in store.section("gradients", COMPONENTS)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not readable JSON"),
        ('{"hello": 1}', "was not written by influencer"),
        ('{"format": "influencer-run", "version": 99, "sections": {}}', "format version 99"),
        ('{"format": "influencer-run", "version": 1, "sections": {"x": 3}}', "damaged"),
        (
            '{"format": "influencer-run", "version": 1, "sections": {"x": {"components": {}, "meta": {},'
            ' "entries": {"k": {"file": "../../etc/passwd", "sha256": "", "shape": [], "dtype": "f8"}}}}}',
            "entry 'k' is malformed",
        ),
    ],
)
def test_foreign_or_corrupt_manifest_is_refused(tmp_path, content, message):
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(StoreError, match=message) as info:
        RunStore(tmp_path)
    assert "choose another output directory" in str(info.value)


def test_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not an influencer run directory"):
        RunStore(tmp_path)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    assert not (tmp_path / MANIFEST).exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_bytes(target, b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind


def test_an_entry_is_listed_only_once_written(tmp_path, monkeypatch):
    with RunStore(tmp_path) as store:
        s = store.section("gradients", COMPONENTS)
        s.save("c0", np.zeros(2))
        failing = _fail_for_npy(atomic_write_bytes)
        monkeypatch.setattr("influencer.app.run.section.atomic_write_bytes", failing)
        with pytest.raises(OSError):
            s.save("c1", np.zeros(2))
    with RunStore(tmp_path) as store:
        assert store.section("gradients", COMPONENTS).keys() == ["c0"]


def _fail_for_npy(original):
    def write(path, data):
        if path.suffix == ".npy":
            raise OSError("killed")
        original(path, data)

    return write


def test_never_pickles(tmp_path):
    with RunStore(tmp_path) as store:
        s = store.section("gradients", COMPONENTS)
        with pytest.raises(StoreError, match="pickle"):
            s.save("bad", np.array([{"a": 1}], dtype=object))
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_array(tmp_path / "evil.npy")


def test_bad_keys_are_refused(tmp_path):
    with RunStore(tmp_path) as store, pytest.raises(StoreError, match="cache keys"):
        store.section("gradients", COMPONENTS).save("../escape", np.zeros(1))


HOLD_LOCK = """
import sys, time
from influencer.app.run.store import RunStore
store = RunStore(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_refuses_a_live_run_and_is_freed_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=f"another influencer run \\(process {holder.pid}\\) is using"):
            RunStore(tmp_path)
        assert (tmp_path / MANIFEST).is_file()  # untouched by the refused second store
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the operating system drops the lock
        holder.wait()
    with RunStore(tmp_path):  # the holder is gone, and so is its lock
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
        with pytest.raises(StoreError, match=f"process {os.getpid()}"):
            RunStore(tmp_path)  # exclusive within one process too
    assert not (tmp_path / ".lock").exists()
    RunStore(tmp_path)  # a store that is never closed releases the lock when it is collected
    with RunStore(tmp_path):
        pass


def test_a_refused_directory_gets_no_lock_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an influencer run directory"):
        RunStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_outputs_are_committed_as_one_set(tmp_path, monkeypatch):
    with RunStore(tmp_path) as store:
        store.commit_outputs({"a.txt": b"old a", "b.txt": b"old b", "s.json": b"old s"}, last="s.json")
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} >= {"a.txt", "b.txt", "s.json"}

    # Killed while writing the staging folder: the previous outputs are untouched and the staging
    # folder is dropped when the directory is next opened.
    real_write = store_module.write_durable

    def die_on_second(path, data):
        if path.name == "b.txt":
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(store_module, "write_durable", die_on_second)
    with RunStore(tmp_path) as store, pytest.raises(KeyboardInterrupt):
        store.commit_outputs({"a.txt": b"new a", "b.txt": b"new b", "s.json": b"new s"}, last="s.json")
    monkeypatch.undo()
    assert [(tmp_path / n).read_bytes() for n in ("a.txt", "b.txt", "s.json")] == [
        b"old a",
        b"old b",
        b"old s",
    ]
    with RunStore(tmp_path):
        assert not (tmp_path / ".staging").exists()

    # Killed while moving the files into place: the summary goes first, and the next open finishes.
    real_replace = os.replace
    moved = []

    def die_after_one_move(src, dst):
        if ".staging" in str(src):
            if moved:
                raise KeyboardInterrupt
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_after_one_move)
    with RunStore(tmp_path) as store, pytest.raises(KeyboardInterrupt):
        store.commit_outputs({"a.txt": b"new a", "s.json": b"new s"}, last="s.json")
    monkeypatch.undo()
    assert not (tmp_path / "s.json").exists()  # no summary beside a mix of old and new files
    assert (tmp_path / "a.txt").read_bytes() == b"new a" and (tmp_path / ".commit.json").exists()
    with RunStore(tmp_path) as store:
        assert (tmp_path / "s.json").read_bytes() == b"new s"
        assert not (tmp_path / "b.txt").exists()  # the previous set's file the new one lacks
        assert store.manifest["outputs"] == ["a.txt", "s.json"]
    assert not (tmp_path / ".commit.json").exists() and not (tmp_path / ".staging").exists()


def test_files_get_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "x", b"1")
        with RunStore(tmp_path / "run") as store:
            store.commit_outputs({"y": b"2"})
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "run" / "y").stat().st_mode & 0o777 == 0o640


def test_describe_changes():
    assert (
        describe_changes({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": "x"})
        == 'b.c 2 -> 3, d "unset" -> "x"'
    )


@pytest.mark.parametrize("name", [".lock", "explain.log"])
def test_a_link_planted_in_a_run_directory_is_refused_and_its_target_untouched(tmp_path, name):
    from influencer.app.run.logs import run_logging
    from influencer.errors import InfluencerError

    run, target = tmp_path / "run", tmp_path / "victim.txt"
    RunStore(run).close()  # an existing run directory
    target.write_text("precious")
    (run / name).symlink_to(target)
    with (
        pytest.raises(InfluencerError, match="symbolic link"),
        RunStore(run),
        run_logging(run, console=False),
    ):
        pass
    assert target.read_text() == "precious"
