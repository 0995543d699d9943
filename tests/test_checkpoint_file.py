"""common.checkpoint_file on real ``torch.save`` files, hostile files and changing files.

Tests that need torch to *write* a checkpoint skip when torch is not importable;
the module under test never imports torch itself (checked in a subprocess).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest

from common.checkpoint_file import (
    ChangedWhileReading,
    Digests,
    ZipCheck,
    check_torch_zip,
    hash_file,
    read_checkpoint_meta,
    summarize_meta,
)

REPO = Path(__file__).resolve().parents[1]
TRUNCATED = "truncated or still being written"
_LOCAL = b"PK\x03\x04"


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def np() -> Any:
    return pytest.importorskip("numpy")


def check_path(path: Path) -> ZipCheck:
    with open(path, "rb") as f:
        return check_torch_zip(f, os.fstat(f.fileno()).st_size)


def check_bytes(data: bytes) -> ZipCheck:
    return check_torch_zip(io.BytesIO(data), len(data))


def meta_of(path: Path) -> dict | None:
    with open(path, "rb") as f:
        return read_checkpoint_meta(f)


def mmcv_meta(np: Any) -> dict[str, Any]:
    """What mmcv 1.x ``save_checkpoint`` puts in ``meta`` (mmdet-wandb-hook.md §4.1), numpy values included."""
    return {
        "mmdet_version": "2.28.2+1a2b3c4",
        "CLASSES": ("person", "bicycle", "car"),
        "env_info": "sys.platform: linux\nPython: 3.11.7",
        "config": "model = dict(type='FasterRCNN')\noptimizer = dict(lr=0.02)\n",
        "seed": 42,
        "exp_name": "faster_rcnn_r50_fpn_1x_coco.py",
        "hook_msgs": {
            "last_ckpt": "/work_dirs/frcnn/epoch_1.pth",
            "best_score": np.float64(0.3125),
            "best_ckpt": "/work_dirs/frcnn/best_bbox_mAP_epoch_1.pth",
            "lr": np.float32(0.02),
            "best_epoch": np.int64(1),
        },
        "scalars": [np.bool_(True), np.int8(-3), np.uint32(7), np.float16(0.5)],
        "epoch": 2,
        "iter": 2 * 7330,
        "mmcv_version": "1.7.2",
        "time": "Tue Feb 28 11:20:03 2023",
    }


def expected_json(meta: dict[str, Any]) -> dict[str, Any]:
    """The same meta with numpy scalars as Python numbers and tuples as lists."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v.item() if hasattr(v, "item") else v

    return json.loads(json.dumps(plain(meta)))


def state_dict(torch: Any, megabytes: float) -> collections.OrderedDict:
    n = int(megabytes * 1024 * 1024 / 4)
    sd = collections.OrderedDict()
    sd["backbone.conv1.weight"] = torch.randn(64, 3, 7, 7)
    sd["backbone.bn1.num_batches_tracked"] = torch.tensor(7330)
    sd["roi_head.bbox_head.fc_cls.weight"] = torch.randn(max(n - 64 * 3 * 7 * 7, 1))
    sd["roi_head.bbox_head.fc_cls.bias"] = torch.zeros(4, dtype=torch.float16)
    return sd


def save_like_mmcv(torch: Any, checkpoint: dict, path: Path) -> None:
    """mmcv/mmengine: torch.save into BytesIO, then one write to the final path (archive name 'archive')."""
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    path.write_bytes(buf.getvalue())


def test_small_checkpoint_ok_and_meta_exact(torch: Any, np: Any, tmp_path: Path) -> None:
    meta = mmcv_meta(np)
    sd = state_dict(torch, 0.05)
    checkpoint = {
        "meta": meta,
        "state_dict": sd,
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.02, "params": [0]}]},
    }
    via_buffer, via_path = tmp_path / "epoch_2.pth", tmp_path / "direct" / "epoch_2.pth"
    save_like_mmcv(torch, checkpoint, via_buffer)
    via_path.parent.mkdir()
    torch.save(checkpoint, via_path)  # archive folder named after the file: "epoch_2/"
    for path in (via_buffer, via_path):
        assert check_path(path) == ZipCheck(True, None)
        got = meta_of(path)
        assert got == expected_json(meta)
        assert json.loads(json.dumps(got, allow_nan=False)) == got
        assert got["hook_msgs"]["best_score"] == 0.3125
        assert got["hook_msgs"]["lr"] == float(np.float32(0.02))
        assert got["hook_msgs"]["best_epoch"] == 1 and isinstance(got["hook_msgs"]["best_epoch"], int)
        assert summarize_meta(got) == {
            "epoch": 2,
            "iter": 14660,
            "mmdet_version": "2.28.2+1a2b3c4",
            "mmcv_version": "1.7.2",
            "CLASSES": ["person", "bicycle", "car"],
        }


class CountingReader(io.RawIOBase):
    """A file that counts the bytes it hands out, to prove the check reads only tail + directory."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def close(self) -> None:
        self.f.close()
        super().close()


def test_mid_size_checkpoint_reads_only_tail_and_directory(torch: Any, np: Any, tmp_path: Path) -> None:
    meta = mmcv_meta(np)
    path = tmp_path / "epoch_12.pth"
    save_like_mmcv(torch, {"meta": meta, "state_dict": state_dict(torch, 50)}, path)
    size = path.stat().st_size
    assert size > 50 * 1024 * 1024
    reader = CountingReader(path)
    try:
        assert check_torch_zip(reader, size).ok  # type: ignore[arg-type]
        assert reader.read_bytes < 128 * 1024
    finally:
        reader.close()
    assert meta_of(path) == expected_json(meta)


def test_mmengine_meta_and_unknown_objects(torch: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mmengine keeps classes in dataset_meta; objects of other libraries load as placeholders."""
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:  # pickled by reference, like mmengine's own class in a message_hub
        def __init__(self) -> None:
            self.values = [1.0, 2.0]

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer  # type: ignore[attr-defined]
    for name in ("mmengine", "mmengine.logging"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    meta = {
        "epoch": 12, "iter": 87960, "cfg": "model = dict()\n", "seed": 1,
        "experiment_name": "rtmdet_tiny_20240101_000000", "time": "20240101_010203",
        "mmengine_version": "0.10.4", "mmdet_version": "3.3.0",
        "dataset_meta": {"classes": ("cat", "dog"), "palette": [(220, 20, 60), (119, 11, 32)]},
        "buffer": HistoryBuffer(), "device": torch.device("cpu"), "dtype": torch.float16,
        "scale": torch.tensor(2.0), "nan": float("nan"), "raw": b"\x00\x01", "ids": {3, 1},
    }  # fmt: skip
    path = tmp_path / "epoch_12.pth"
    save_like_mmcv(torch, {"meta": meta, "state_dict": state_dict(torch, 0.01), "message_hub": {}}, path)
    got = meta_of(path)
    assert got is not None
    assert json.loads(json.dumps(got, allow_nan=False)) == got
    assert got["dataset_meta"] == {"classes": ["cat", "dog"], "palette": [[220, 20, 60], [119, 11, 32]]}
    assert got["buffer"] == "<refused mmengine.logging.history_buffer.HistoryBuffer>"
    assert got["device"] == "<torch.device>" and got["dtype"] == "<torch.float16>"
    assert got["scale"] == "<torch._utils._rebuild_tensor_v2>"
    assert (got["nan"], got["raw"], got["ids"]) == ("nan", "<2 bytes>", [1, 3])
    assert summarize_meta(got) == {
        "epoch": 12, "iter": 87960, "mmdet_version": "3.3.0", "mmengine_version": "0.10.4", "CLASSES": ["cat", "dog"],
    }  # fmt: skip


def test_every_truncation_is_incomplete(torch: Any, np: Any, tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pth"
    save_like_mmcv(torch, {"meta": mmcv_meta(np), "state_dict": state_dict(torch, 0.002)}, path)
    data = path.read_bytes()
    assert check_bytes(data).ok
    for size in range(len(data)):
        result = check_torch_zip(io.BytesIO(data), size)  # the size a watcher saw; the bytes may be longer
        assert not result.ok and result.reason, size
        prefix = check_bytes(data[:size])
        assert not prefix.ok, size
        assert prefix.reason == result.reason, size
        assert size == 0 or TRUNCATED in prefix.reason, (size, prefix.reason)
    for size in range(0, len(data), 97):
        assert read_checkpoint_meta(io.BytesIO(data[:size])) is None


def _eocd_at(data: bytes) -> int:
    return data.rindex(b"PK\x05\x06")


def test_zip64_checkpoint_written_by_torch(torch: Any, tmp_path: Path) -> None:
    """A real torch zip64 archive whose 32-bit counts are sentinels, and one with sentinel offsets too.

    torch's writer (miniz) always adds a zip64 end record and locator, but fills the
    32-bit EOCD fields with the real values while they fit. With 66,000 one-element
    tensors (separate storages, ~17 MB, a few seconds) the entry count passes 0xFFFF,
    so the EOCD holds the sentinel and only the zip64 record has the count: a
    genuine large-archive case without writing 4 GiB. The second file also sets the
    EOCD's size and offset to 0xFFFFFFFF, as writers do beyond 4 GiB, so those must
    come from the zip64 record as well. Python's zipfile reads both.
    """
    path = tmp_path / "epoch_3.pth"
    save_like_mmcv(torch, {"meta": {"epoch": 3, "iter": 30}, "state_dict": [torch.zeros(1) for _ in range(66_000)]}, path)
    data = path.read_bytes()
    eocd = _eocd_at(data)
    assert eocd == len(data) - 22 and data[eocd - 20 : eocd - 16] == b"PK\x06\x07"
    assert struct.unpack_from("<HH", data, eocd + 8) == (0xFFFF, 0xFFFF)
    assert check_bytes(data) == ZipCheck(True, None)
    assert meta_of(path) == {"epoch": 3, "iter": 30}

    sentinel = bytearray(data)
    struct.pack_into("<LL", sentinel, eocd + 12, 0xFFFFFFFF, 0xFFFFFFFF)
    assert check_bytes(bytes(sentinel)).ok
    assert len(zipfile.ZipFile(io.BytesIO(bytes(sentinel))).namelist()) > 66_000
    assert read_checkpoint_meta(io.BytesIO(bytes(sentinel))) == {"epoch": 3, "iter": 30}

    for size in (len(data) - 1, len(data) - 21, len(data) - 23, len(data) - 42):
        assert TRUNCATED in check_torch_zip(io.BytesIO(data), size).reason  # type: ignore[operator]

    # zipfile takes the zip64 end record from right before its locator (where torch writes it): a damaged one
    # leaves the sentinel fields unresolved and the central directory unreadable.
    z64 = struct.unpack_from("<Q", data, eocd - 20 + 8)[0]
    assert z64 == eocd - 20 - 56
    for variant in (data, bytes(sentinel)):
        bad_record = bytearray(variant)
        bad_record[z64 + 1] = ord("X")
        assert TRUNCATED in check_bytes(bytes(bad_record)).reason  # type: ignore[operator]
        assert read_checkpoint_meta(io.BytesIO(bytes(bad_record))) is None


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "epoch_1.pth").touch()
    assert check_path(tmp_path / "epoch_1.pth") == ZipCheck(False, "empty file")
    assert meta_of(tmp_path / "epoch_1.pth") is None


@pytest.mark.parametrize(
    "text",
    [
        b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 167\n",
        b"placeholder: checkpoint moved to s3://bucket/epoch_1.pth\n",
        b"x",  # shorter than a zip signature and not a prefix of one
    ],
)
def test_text_placeholder(text: bytes, tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pth"
    path.write_bytes(text)
    result = check_path(path)
    assert not result.ok
    assert result.reason == "not a zip file (legacy torch format or not a checkpoint)"
    assert meta_of(path) is None


def test_legacy_torch_format(torch: Any, tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": state_dict(torch, 0.01)}, path, _use_new_zipfile_serialization=False)
    result = check_path(path)
    assert not result.ok and "legacy" in result.reason  # type: ignore[operator]
    assert meta_of(path) is None


def test_random_bytes() -> None:
    noise = os.urandom(100_000)
    assert check_bytes(b"\x00" + noise).reason == "not a zip file (legacy torch format or not a checkpoint)"
    assert TRUNCATED in check_bytes(b"PK\x03\x04" + noise).reason  # type: ignore[operator]
    assert read_checkpoint_meta(io.BytesIO(b"PK\x03\x04" + noise)) is None


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, payload in entries.items():
            zf.writestr(name, payload)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ({"archive/version": b"3\n", "archive/data/0": b"\0" * 8}, "not a torch checkpoint: no archive/data.pkl"),
        ({"archive/data.pkl": pickle.dumps({"meta": {}}, 2)}, "not a torch checkpoint: no archive/version record"),
        ({"notes.txt": b"hi", "archive/data.pkl": b"", "archive/version": b"3\n"},
         "not a torch checkpoint: entries are not inside an archive folder"),
        ({}, "not a torch checkpoint: the zip archive is empty"),
    ],
)  # fmt: skip
def test_zip_that_is_not_a_torch_checkpoint(entries: dict[str, bytes], reason: str) -> None:
    assert check_bytes(make_zip(entries)) == ZipCheck(False, reason)


def test_old_torch_version_record_location() -> None:
    """Readers try ``<archive>/.data/version`` first, then ``<archive>/version``; either is a version record."""
    data = make_zip({"archive/data.pkl": pickle.dumps({"meta": {"epoch": 1}}, 2), "archive/.data/version": b"3\n"})
    assert check_bytes(data).ok
    assert read_checkpoint_meta(io.BytesIO(data)) == {"epoch": 1}


def test_corrupt_central_directory(torch: Any, tmp_path: Path) -> None:
    """torch writes a zip64 end record + locator even for small files; both records must agree."""
    path = tmp_path / "epoch_1.pth"
    save_like_mmcv(torch, {"meta": {"epoch": 1}, "state_dict": state_dict(torch, 0.001)}, path)
    data = path.read_bytes()
    eocd = _eocd_at(data)
    assert data[eocd - 20 : eocd - 16] == b"PK\x06\x07"
    z64 = struct.unpack_from("<Q", data, eocd - 20 + 8)[0]
    count, _, cd_offset = struct.unpack_from("<QQQ", data, z64 + 32)

    more = bytearray(data)
    struct.pack_into("<HH", more, eocd + 8, count + 2, count + 2)  # the 16-bit counts hold real values while they fit
    assert check_bytes(bytes(more)).reason == f"central directory holds {count} entries, end record says {count + 2}"

    moved = bytearray(data)
    struct.pack_into("<Q", moved, z64 + 48, cd_offset - 1)
    struct.pack_into("<L", moved, eocd + 16, 0xFFFFFFFF)
    assert "does not end at the end record" in check_bytes(bytes(moved)).reason  # type: ignore[operator]

    prefixed = _LOCAL + b"\0" * 3 + data  # zipfile would shift every offset by these 7 bytes; a torch file has none
    assert "bytes before the archive" in check_bytes(prefixed).reason  # type: ignore[operator]

    bad_sig = bytearray(data)
    bad_sig[cd_offset + 1] = ord("X")
    assert TRUNCATED in check_bytes(bytes(bad_sig)).reason  # type: ignore[operator]

    commented = bytearray(data)
    struct.pack_into("<H", commented, eocd + 20, 5)
    assert check_bytes(bytes(commented) + b"hello").ok  # a comment is allowed; the EOCD is found by search
    assert not check_bytes(bytes(commented) + b"hell").ok


def test_corrupt_plain_zip_end_record() -> None:
    """Without zip64 records (Python's zipfile, older writers) the 32-bit EOCD fields are the truth."""
    data = make_zip({"archive/data.pkl": pickle.dumps({"meta": {"epoch": 1}}, 2), "archive/version": b"3\n"})
    eocd = _eocd_at(data)
    assert eocd == len(data) - 22 and b"PK\x06\x07" not in data
    assert check_bytes(data).ok
    more = bytearray(data)
    struct.pack_into("<HH", more, eocd + 8, 5, 5)
    assert check_bytes(bytes(more)).reason == "central directory holds 2 entries, end record says 5"
    moved = bytearray(data)
    struct.pack_into("<L", moved, eocd + 16, struct.unpack_from("<L", data, eocd + 16)[0] + 1)
    assert "does not end at the end record" in check_bytes(bytes(moved)).reason  # type: ignore[operator]


# --- hostile pickles ---------------------------------------------------------------------------------


def torch_like_zip(data_pkl: bytes) -> bytes:
    return make_zip({"archive/data.pkl": data_pkl, "archive/version": b"3\n"})


class _Reduce:
    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    return {
        "os.system": pickle.dumps({"meta": {"epoch": 1, "x": _Reduce(os.system, (cmd,))}}, 2),
        "eval": pickle.dumps({"meta": {"epoch": 1, "x": _Reduce(eval, (f"__import__('os').system({cmd!r})",))}}, 4),
        "getattr chain": pickle.dumps(
            {"meta": {"epoch": 1, "x": _Reduce(getattr, (_Reduce(__import__, ("os",)), "system"))}}, 2
        ),
        # protocol 2 NEWOBJ on a refused class: {"meta": {"epoch": 1, "x": Popen.__new__(Popen, cmd)}}
        "NEWOBJ": b"\x80\x02}(" + _binunicode("meta") + b"}(" + _binunicode("epoch") + b"K\x01" + _binunicode("x")
        + b"csubprocess\nPopen\n" + _binunicode(cmd) + b"\x85\x81uu.",
        # protocol 0 INST opcode: os.system(cmd) built as an "instance"
        "INST": b"(dp0\nVmeta\np1\n(dp2\nVepoch\np3\nI1\nsVx\np4\n(V" + cmd.encode() + b"\nios\nsystem\np5\nss.",
        "top-level call": pickle.dumps(_Reduce(os.system, (cmd,)), 2),
    }


def test_hostile_pickles_are_live(tmp_path: Path) -> None:
    """Control: an ordinary unpickler does run these payloads, so the next test means something."""
    for name in ("os.system", "eval", "INST", "top-level call"):
        marker = tmp_path / name.replace(" ", "_").replace(".", "_")
        pickle.loads(hostile_pickles(marker)[name])
        assert marker.exists(), name


def test_hostile_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, payload in hostile_pickles(marker).items():
        data = torch_like_zip(payload)
        assert check_bytes(data).ok, name  # the container is fine; only the pickle is hostile
        got = read_checkpoint_meta(io.BytesIO(data))
        assert not marker.exists(), name
        if name == "top-level call":
            assert got is None
        else:
            assert got is not None and got["epoch"] == 1, name
            assert isinstance(got["x"], str) and got["x"].startswith("<refused"), (name, got)


def test_absurd_nesting_is_no_metadata() -> None:
    """A small pickle can nest lists 100,000 deep (EMPTY_LIST × n, APPEND × n-1); pickle.dumps could not."""
    n = 100_000
    data = torch_like_zip(
        b"\x80\x02}(" + _binunicode("meta") + b"}(" + _binunicode("epoch") + b"K\x01" + _binunicode("deep")
        + b"]" * n + b"a" * (n - 1) + b"uu."
    )
    assert read_checkpoint_meta(io.BytesIO(data)) is None


def test_module_imports_neither_torch_nor_numpy(torch: Any, np: Any, tmp_path: Path) -> None:
    path = tmp_path / "epoch_2.pth"
    meta = mmcv_meta(np)
    save_like_mmcv(torch, {"meta": meta, "state_dict": state_dict(torch, 0.01)}, path)
    code = (
        "import sys, json; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
        "from common import checkpoint_file\n"
        f"f = open({str(path)!r}, 'rb')\n"
        "import os; assert checkpoint_file.check_torch_zip(f, os.fstat(f.fileno()).st_size).ok\n"
        "print(json.dumps(checkpoint_file.read_checkpoint_meta(f)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == expected_json(meta)


# --- hashing -----------------------------------------------------------------------------------------


def expected_digests(data: bytes) -> Digests:
    md5 = hashlib.md5(data).digest()
    return Digests(len(data), base64.b64encode(md5).decode(), md5.hex(), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536 + 5, 1_000_003])
def test_hash_file_matches_hashlib(size: int, tmp_path: Path) -> None:
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        f.seek(size // 2)  # the caller's position does not matter
        assert hash_file(f, chunk=65536) == expected_digests(data)
    if shutil.which("md5sum") and shutil.which("sha256sum"):
        with open(path, "rb") as f:
            got = hash_file(f)
        assert got.md5_hex == subprocess.check_output(["md5sum", str(path)], text=True).split()[0]
        assert got.sha256_hex == subprocess.check_output(["sha256sum", str(path)], text=True).split()[0]


def test_hash_file_of_pinned_unlinked_file(tmp_path: Path) -> None:
    """MMDetection's max_keep_ckpts may delete the file; an open handle (or hard link) still reads it."""
    data = os.urandom(300_000)
    path = tmp_path / "epoch_1.pth"
    path.write_bytes(data)
    with open(path, "rb") as f:
        path.unlink()
        assert hash_file(f, chunk=65536) == expected_digests(data)


@pytest.mark.parametrize("change", ["append", "truncate", "rewrite same size"])
def test_changed_while_reading(change: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "epoch_1.pth"
    path.write_bytes(os.urandom(1_000_000))
    real_preadv = os.preadv
    calls = 0

    def preadv_then_change(fd: int, buffers: list, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:  # the writer strikes after the first chunk was read
            if change == "append":
                with open(path, "ab") as w:
                    w.write(b"more")
            elif change == "truncate":
                os.truncate(path, 500_000)
            else:
                with open(path, "r+b") as w:
                    w.write(b"x")
                st = os.stat(path)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv_then_change)
    with open(path, "rb") as f, pytest.raises(ChangedWhileReading):
        hash_file(f, chunk=65536)
