"""Atomic writes: all or nothing, existing outputs and inputs protected, disk-full reported, manifests."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from bitalloc.errors import InputError
from bitalloc.io.atomic import (
    TEMP_SUFFIX, atomic_write, atomic_write_dir, file_digest, manifest, remove_stale_temps, tensor_digest,
    verify_manifest, write_manifest,
)


def test_writes_complete_file(tmp_path):
    p = tmp_path / "out.bin"
    with atomic_write(p) as f:
        f.write(b"hello")
        assert not p.exists()  # nothing at the destination until the block succeeds
    assert p.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_error_mid_write_leaves_nothing(tmp_path, exc):
    p = tmp_path / "out.bin"
    with pytest.raises(type(exc)):
        with atomic_write(p) as f:
            f.write(b"x" * 10_000)
            raise exc
    assert os.listdir(tmp_path) == []


def test_error_keeps_the_previous_file_when_overwriting(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(p, overwrite=True) as f:
            f.write(b"new new new")
            raise RuntimeError
    assert p.read_bytes() == b"old"
    with atomic_write(p, overwrite=True) as f:
        f.write(b"new")
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_existing_destination_is_refused(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"precious")
    with pytest.raises(InputError, match=f"output {p} already exists"):
        with atomic_write(p) as f:
            f.write(b"x")
    assert p.read_bytes() == b"precious"
    with pytest.raises(InputError, match="does not exist"):
        atomic_write(tmp_path / "no" / "dir.bin").__enter__()
    with pytest.raises(InputError, match="is a directory"):
        atomic_write(tmp_path, overwrite=True).__enter__()


def test_destination_that_is_an_input_is_refused(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"weights")
    link = tmp_path / "alias.safetensors"
    os.link(src, link)  # same inode, different name
    with pytest.raises(InputError, match="is the input"):
        with atomic_write(link, overwrite=True, inputs=[src]) as f:
            f.write(b"")
    assert src.read_bytes() == b"weights"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_during_write_gives_a_clear_error_and_no_file(tmp_path, code):
    p = tmp_path / "big.bin"

    class FullDisk:
        """A file object whose writes fail like a full disk after some bytes."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                raise OSError(code, os.strerror(code))
            return self.f.write(b)

    with pytest.raises(InputError, match=f"disk full while writing {p}"):
        with atomic_write(p) as f:
            out = FullDisk(f)
            for _ in range(10):
                out.write(b"y" * 50)
    assert os.listdir(tmp_path) == []


def test_disk_full_at_fsync(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(InputError, match="disk full"):
        with atomic_write(tmp_path / "a") as f:
            f.write(b"abc")
    assert os.listdir(tmp_path) == []


def test_other_os_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_write(tmp_path / "a"):
            raise PermissionError(errno.EACCES, "denied")
    assert os.listdir(tmp_path) == []


def test_verify_failure_abandons_the_write(tmp_path):
    def verify(tmp):
        assert tmp.read_bytes() == b"data" and tmp.parent == tmp_path
        raise InputError("read-back mismatch")

    with pytest.raises(InputError, match="mismatch"):
        with atomic_write(tmp_path / "v", verify=verify) as f:
            f.write(b"data")
    assert os.listdir(tmp_path) == []


def test_atomic_dir(tmp_path):
    out = tmp_path / "model"
    with atomic_write_dir(out) as d:
        (d / "a.txt").write_text("a")
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("b")
        assert not out.exists()
    assert (out / "sub" / "b.txt").read_text() == "b"
    with pytest.raises(InputError, match="already exists"):
        atomic_write_dir(out).__enter__()
    with pytest.raises(RuntimeError):
        with atomic_write_dir(out, overwrite=True) as d:
            (d / "c.txt").write_text("c")
            raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "sub"]
    with atomic_write_dir(out, overwrite=True) as d:
        (d / "c.txt").write_text("c")
    assert [p.name for p in out.iterdir()] == ["c.txt"]
    assert sorted(os.listdir(tmp_path)) == ["model"]
    with pytest.raises(InputError, match="contains the input"):
        atomic_write_dir(out, overwrite=True, inputs=[out / "c.txt"]).__enter__()


def test_remove_stale_temps(tmp_path):
    (tmp_path / f".x.abc{TEMP_SUFFIX}").write_bytes(b"partial")
    (tmp_path / "keep.bin").write_bytes(b"k")
    (tmp_path / f".d.abc{TEMP_SUFFIX}").mkdir()
    assert len(remove_stale_temps(tmp_path)) == 2
    assert os.listdir(tmp_path) == ["keep.bin"]


def test_manifests(tmp_path):
    t = {"a": torch.ones(3), "b": torch.arange(4)}
    m = manifest(t)
    assert m == {"a": tensor_digest(torch.ones(3)), "b": tensor_digest(torch.arange(4))}
    # dtype and shape are part of the digest
    assert tensor_digest(torch.zeros(4)) != tensor_digest(torch.zeros(2, 2))
    assert tensor_digest(torch.zeros(4)) != tensor_digest(torch.zeros(4, dtype=torch.int32))
    assert tensor_digest(torch.arange(6).reshape(2, 3).t()) == tensor_digest(torch.arange(6).reshape(2, 3).t().contiguous())
    write_manifest(tmp_path / "m.json", m)
    verify_manifest(tmp_path / "m.json", t)
    with pytest.raises(InputError, match="b differs"):
        verify_manifest(tmp_path / "m.json", {"a": torch.ones(3), "b": torch.arange(4) + 1})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"123")
    assert manifest(tmp_path / "d") == {"f": file_digest(tmp_path / "d" / "f")}
    assert manifest([tmp_path / "d" / "f"]) == manifest(tmp_path / "d")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="malformed"):
        verify_manifest(tmp_path / "bad.json", t)


def test_outputs_get_umask_permissions_not_private_temp_ones(tmp_path):
    import os
    import stat

    from bitalloc.io.atomic import atomic_write, atomic_write_dir

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "f.bin") as f:
            f.write(b"x")
        with atomic_write_dir(tmp_path / "d") as d:
            (d / "a").write_bytes(b"y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
