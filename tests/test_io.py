"""The one atomic-write helper: a failed write leaves the old file and no temp file."""

import os

import pytest

from vitablate.io import atomic_path, warning_lines, write_text


def test_success_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"  # the parent folder is created
    with atomic_path(str(path)) as tmp:
        assert os.path.dirname(tmp) == str(path.parent) and tmp != str(path)
        with open(tmp, "w") as f:
            f.write("new")
        assert not path.exists()  # nothing visible until the block ends
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["out.txt"]


def test_failure_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(str(path), fsync=True) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the ne")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_suffix_and_fsync(tmp_path):
    path = tmp_path / "fig.png"
    with atomic_path(str(path), suffix=".png", fsync=True) as tmp:
        assert tmp.endswith(".png")
        with open(tmp, "wb") as f:
            f.write(b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG"


def test_write_text_interrupted_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("old")

    def refuse(src, dst):  # the rename itself fails (a read-only mount)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="Read-only"):
        write_text(str(path), "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]


def test_warning_lines_since_an_offset(tmp_path):
    log = tmp_path / "job.log"
    log.write_text("2024-01-01 [vitablate] warning: an earlier attempt\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("2024-01-02 [vitablate] train_classifier x on node\n2024-01-02 [vitablate] warning: c.pt belongs "
                "to a different config; training from scratch\n")
    assert warning_lines(str(log), start) == [
        "2024-01-02 [vitablate] warning: c.pt belongs to a different config; training from scratch"]
    assert len(warning_lines(str(log))) == 2 and warning_lines(None) == [] and warning_lines(str(tmp_path / "no")) == []
