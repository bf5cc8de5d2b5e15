"""Opening a file to write never follows a link planted where the file belongs."""

from __future__ import annotations

import os

import pytest

from influencer._kernel.files import open_no_follow
from influencer.errors import UnsafePathError

pytestmark = pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="O_NOFOLLOW is POSIX")


@pytest.mark.parametrize("how", ["w", "a", "x", "+"])
def test_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path, how):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(target)
    with pytest.raises(UnsafePathError, match=r"\.lock is a symbolic link to .*precious\.txt; remove it"):
        open_no_follow(tmp_path / "run" / ".lock", how)
    assert target.read_bytes() == b"keep me"
    # a dangling link is refused too (following it would create the target)
    (tmp_path / "run" / "explain.log").symlink_to(tmp_path / "elsewhere.log")
    with pytest.raises(UnsafePathError, match=r"explain\.log is a symbolic link"):
        open_no_follow(tmp_path / "run" / "explain.log", how)
    assert not (tmp_path / "elsewhere.log").exists()


def test_hard_links_fifos_and_directories_are_refused(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep me")
    os.link(target, tmp_path / "hard")
    with pytest.raises(UnsafePathError, match=r"hard has 1 other hard link\(s\)"):
        open_no_follow(tmp_path / "hard", "w")
    assert target.read_bytes() == b"keep me"  # not truncated: checked before truncation
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafePathError, match=r"fifo is a FIFO or socket, not a file"):
        open_no_follow(tmp_path / "fifo", "a")  # no reader: without O_NONBLOCK this would hang
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        open_no_follow(tmp_path / "dir", "w")


def test_ordinary_files_are_written_appended_and_kept(tmp_path):
    path = tmp_path / "log.txt"
    with open_no_follow(path, "a", text=True) as f:
        f.write("one\n")
    with open_no_follow(path, "a", text=True) as f:
        f.write("two\n")
    assert path.read_text() == "one\ntwo\n"
    with open_no_follow(path, "+") as f:  # a lock file: opened read-write, never truncated
        assert f.read() == b"one\ntwo\n"
    with open_no_follow(path, "w") as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(FileExistsError):
        open_no_follow(path, "x")
    with pytest.raises(ValueError, match=r"how must be one of"):
        open_no_follow(path, "r")
