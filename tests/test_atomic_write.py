"""write_atomic: whole files or none under the real name, and no temporary left behind."""

import os
import shutil

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


def _folder(path, text):
    path.mkdir()
    (path / "x").write_text(text)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_replace_folder_puts_the_new_one_in_place_and_deletes_the_old(
    tmp_path, monkeypatch, exchange
):
    from mpt_jax import atomic_write

    if not exchange:  # a system or file system without RENAME_EXCHANGE
        monkeypatch.setattr(atomic_write, "_exchange", lambda a, b: False)
    elif not atomic_write._exchange(_folder(tmp_path / "a", "a"), _folder(tmp_path / "b", "b")):
        pytest.skip("no renameat2 RENAME_EXCHANGE here")
    else:
        assert (tmp_path / "a" / "x").read_text() == "b"  # swapped
        assert (tmp_path / "b" / "x").read_text() == "a"
        shutil.rmtree(tmp_path / "a")
        shutil.rmtree(tmp_path / "b")
    atomic_write.replace_folder(_folder(tmp_path / ".ds.tmp-1", "new"), tmp_path / "ds")
    assert (tmp_path / "ds" / "x").read_text() == "new"  # nothing there before
    atomic_write.replace_folder(_folder(tmp_path / ".ds.tmp-2", "newer"), tmp_path / "ds")
    assert (tmp_path / "ds" / "x").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    # killed before the old contents are deleted: the new folder is in place all the same, the
    # old one in a hidden sibling that stale_siblings names
    monkeypatch.setattr(atomic_write.shutil, "rmtree", _killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write.replace_folder(_folder(tmp_path / ".ds.tmp-3", "newest"), tmp_path / "ds")
    monkeypatch.undo()
    assert (tmp_path / "ds" / "x").read_text() == "newest"
    (stale,) = atomic_write.stale_siblings(tmp_path / "ds")
    assert (stale / "x").read_text() == "newer" and stale.name.startswith(".ds.")


def _killed(path, *args, **kwargs):
    raise KeyboardInterrupt


def test_temporary_siblings_get_the_umask_and_map_back_to_their_folder(tmp_path):
    from mpt_jax.atomic_write import sibling_target, stale_siblings, temporary_sibling

    old_umask = os.umask(0o022)
    try:
        tmp = temporary_sibling(tmp_path / "runs" / "hf")
    finally:
        os.umask(old_umask)
    # mkdtemp's 0700 would survive the rename and shut other users out of a shared folder
    assert tmp.is_dir() and tmp.stat().st_mode & 0o777 == 0o755
    assert tmp.name.startswith(".hf.tmp-") and sibling_target(tmp) == tmp_path / "runs" / "hf"
    assert stale_siblings(tmp_path / "runs" / "hf") == [tmp]
    assert sibling_target(tmp_path / ".ba12.old-0a1b") == tmp_path / "ba12"
    assert temporary_sibling(tmp_path / "runs" / "hf") != tmp  # each write its own
