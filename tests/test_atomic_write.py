"""write_atomic: whole files or none under the real name, and no temporary left behind."""

import os

import pytest

from mpt_jax.atomic_write import write_atomic


def test_replaces_whole_with_mode_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "run.sbatch"
    assert write_atomic(path, "old\n") == path
    write_atomic(path, "new\n", mode=0o755)
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.sbatch"]


def test_a_failed_rename_keeps_the_target_and_cleans_up(tmp_path):
    (tmp_path / "results.json").mkdir()  # a folder where the file should go
    (tmp_path / "results.json" / "keep").write_text("x")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "results.json", "{}\n")
    assert (tmp_path / "results.json" / "keep").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_unwritable_reason_names_the_nearest_existing_ancestor(tmp_path):
    from mpt_jax.atomic_write import unwritable_reason

    assert unwritable_reason(tmp_path / "a" / "b") is None  # missing folders are made later
    (tmp_path / "notes").write_text("x")
    reason = unwritable_reason(tmp_path / "notes" / "run")
    assert reason == f"{tmp_path / 'notes'} is a file, not a folder"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root may write anywhere
        pytest.skip("running as root: permissions are not enforced")
    assert unwritable_reason(locked / "run") == f"{locked} is not writable"
