"""An output folder written whole or not at all."""

import pytest

from d2m_dist.runtime.folders import written_whole


def test_a_new_folder_appears_only_when_the_block_ends(tmp_path):
    out = tmp_path / "deep" / "out"
    with written_whole(out) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not out.exists() and tmp.parent == out.parent
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary or set-aside folder left


def test_a_replaced_folder_is_swapped_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with written_whole(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_leaves_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with written_whole(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (out / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
