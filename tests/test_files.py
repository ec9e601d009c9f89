"""dmc.files.write_atomic: same-folder temp file, mode first, fsync, rename, folder fsync."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dmc.files import write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_creates_the_file_with_mode_0600_by_default(tmp_path: Path) -> None:
    path = tmp_path / "svid.key"

    write_atomic(path, b"secret")

    assert path.read_bytes() == b"secret"
    assert _mode(path) == 0o600


def test_write_applies_the_given_mode_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "bundle.pem"
    old_umask = os.umask(0o077)
    try:
        write_atomic(path, b"public", 0o644)
    finally:
        os.umask(old_umask)

    assert _mode(path) == 0o644


def test_write_replaces_an_existing_file_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "svid.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    old_inode = path.stat().st_ino

    with path.open("rb") as reader:
        write_atomic(path, b"new")
        # A reader that opened the old file keeps seeing it whole.
        assert reader.read() == b"old"

    assert path.read_bytes() == b"new"
    assert path.stat().st_ino != old_inode
    assert _mode(path) == 0o600


def test_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a.pem", b"x")
    write_atomic(tmp_path / "a.pem", b"y")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pem"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "svid.key"
    path.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(path, b"new")

    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svid.key"]


def test_mode_is_set_before_any_data_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes_at_chmod: list[int] = []
    real_fchmod = os.fchmod

    def recording_fchmod(fd: int, mode: int) -> None:
        sizes_at_chmod.append(os.fstat(fd).st_size)
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", recording_fchmod)
    write_atomic(tmp_path / "svid.key", b"secret" * 100, 0o640)

    assert sizes_at_chmod == [0]
    assert _mode(tmp_path / "svid.key") == 0o640


def test_temporary_file_is_in_the_same_folder_and_file_and_folder_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[str, Path | None]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            synced.append(("folder", None))
        else:
            parent = Path(os.readlink(f"/proc/self/fd/{fd}")).parent
            synced.append(("file", parent))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_atomic(tmp_path / "svid.pem", b"x")

    assert synced == [("file", tmp_path), ("folder", None)]


def test_relative_path_writes_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    write_atomic("bundle.pem", b"x", 0o644)

    assert (tmp_path / "bundle.pem").read_bytes() == b"x"


def test_missing_folder_is_an_error_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "absent" / "svid.key", b"x")

    assert not (tmp_path / "absent").exists()
