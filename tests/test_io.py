import pytest

from difflens._io import atomic_directory, atomic_path


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "result.json"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "first"                 # old file untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]   # no leftovers


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "fit"
    with pytest.raises(ValueError):
        with atomic_directory(out) as tmp:
            (tmp / "summary.json").write_text("{}")
            raise ValueError("plot failed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "summary.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["summary.json"]
