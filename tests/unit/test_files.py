"""oceanda.data.files: atomic writes honour the umask, out_dir checks, stale temporaries."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from oceanda.data.files import (
    atomic_path,
    check_out_dir,
    clean_stale,
    made_dirs,
    pid_alive,
    umask,
    write_bytes_atomic,
)
from oceanda.errors import InputError


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def mask022():
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def test_umask_reads_the_process_umask():
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_file_and_folder_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        # the reference: what open() / mkdir() create under this umask
        (tmp_path / "ref.txt").write_bytes(b"x")
        (tmp_path / "refdir").mkdir()
        write_bytes_atomic(tmp_path / "a.json", b"{}")
        with atomic_path(tmp_path / "s.zarr", directory=True) as tmp:
            (tmp / "zarr.json").write_text("{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "ref.txt") == 0o666 & ~mask
    assert _mode(tmp_path / "s.zarr") == _mode(tmp_path / "refdir") == 0o777 & ~mask
    assert (tmp_path / "s.zarr" / "zarr.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "ref.txt", "refdir", "s.zarr"]


def test_atomic_path_error_leaves_the_old_content(tmp_path, mask022):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_path(store, directory=True) as tmp:
        (tmp / "b").write_text("2")
        raise KeyboardInterrupt
    assert sorted(p.name for p in store.iterdir()) == ["a"]
    with atomic_path(store, directory=True) as tmp:  # an existing store is replaced whole
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in store.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "s.zarr"]


def test_check_out_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"out_dir=.*file: exists and is not a folder"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(InputError, match=r"out_dir=.*file/sub: cannot be created, .*file is not a folder"):
        check_out_dir(tmp_path / "file" / "sub")
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_out_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match="is not writable"):
            check_out_dir(ro)
        with pytest.raises(InputError, match="cannot be created in"):
            check_out_dir(ro / "x")
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_check_out_dir_unwritable_folder_even_for_root():
    with pytest.raises(InputError, match="out_dir=/proc/oceanda_x"):
        check_out_dir("/proc/oceanda_x")


def test_made_dirs_removes_only_what_it_created(tmp_path):
    (tmp_path / "keep").mkdir()
    with pytest.raises(ValueError), made_dirs(tmp_path / "keep" / "a" / "b") as out:
        out.mkdir(parents=True)
        raise ValueError
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == []
    with pytest.raises(ValueError), made_dirs(tmp_path / "c") as out:  # not empty: kept
        out.mkdir()
        (out / "log").write_text("x")
        raise ValueError
    assert (tmp_path / "c" / "log").exists()
    with made_dirs(tmp_path / "d") as out:  # success: kept
        out.mkdir()
    assert (tmp_path / "d").is_dir()


def test_clean_stale_removes_dead_pids_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid) and pid_alive(os.getpid())
    (tmp_path / f"obs.zarr.tmp-{dead.pid}").mkdir()
    (tmp_path / f"obs.zarr.tmp-{dead.pid}" / "chunk").write_text("x")
    (tmp_path / f"figures.tmp-{dead.pid}").mkdir()
    (tmp_path / f"truth.zarr.tmp-{os.getpid()}").mkdir()          # this process: kept
    (tmp_path / f"truth.zarr.tmp-{os.getppid()}").mkdir()         # alive: kept
    (tmp_path / "obs.zarr").mkdir()
    removed = clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f"obs.zarr.tmp-{dead.pid}", f"figures.tmp-{dead.pid}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["obs.zarr", f"truth.zarr.tmp-{os.getpid()}", f"truth.zarr.tmp-{os.getppid()}"])
    assert clean_stale(tmp_path / "absent") == []
