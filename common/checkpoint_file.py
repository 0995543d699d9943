"""Checkpoint files without torch: completeness check, safe metadata read, one-pass hashing.

MMDetection writes ``epoch_N.pth`` in place (``torch.save`` into memory, then one
``write`` to the final path opened with ``wb``), so a watcher can see a partial file.
A torch zip checkpoint is complete only once its end-of-central-directory record
is written, which happens last (DESIGN.md invariant 7). The uploader installs
without torch: the zip container is read by ``zipfile``, the pickle by hand.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import io
import itertools
import math
import os
import pickle
import stat
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = [
    "ChangedWhileReading",
    "Digests",
    "ZipCheck",
    "check_torch_zip",
    "hash_file",
    "read_checkpoint_meta",
    "summarize_meta",
]

# --- zip container ---------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_EOCD_SIG = b"PK\x05\x06"
_LOCAL_SIG = b"PK\x03\x04"
_SEE_ZIP64 = (0xFFFF, 0xFFFFFFFF)  # a 16/32-bit end record field whose value is in the zip64 end record
_TRUNCATED = "file truncated or still being written"
# torch < 1.6 (and `_use_new_zipfile_serialization=False`) starts with a pickled magic number.
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclass(frozen=True)
class ZipCheck:
    """Whether a file is a complete torch zip checkpoint; ``reason`` says why not."""

    ok: bool
    reason: str | None = None


def _fail(reason: str) -> ZipCheck:
    return ZipCheck(False, reason)


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


class _Prefix(io.RawIOBase):
    """The first ``size`` bytes of ``f``: the file as the caller's ``fstat`` saw it, even if it grew since."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self._size, self._pos = f, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = offset + {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if pos < 0:
            raise OSError(errno.EINVAL, "seek before the start of the file")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        data = _read_at(self._f, self._pos, max(0, min(len(buffer), self._size - self._pos)))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _end_record_problem(f: BinaryIO, size: int, zf: zipfile.ZipFile) -> str | None:
    """What ``zipfile`` does not check: the end record's comment ends exactly at the end of the file,
    its entry count is the central directory's, and no bytes come before the archive (zipfile would
    shift every offset by them)."""
    at = size - _EOCD.size - len(zf.comment)
    record = _read_at(f, at, _EOCD.size)
    _, _, _, _, count, _, cd_offset, comment_len = _EOCD.unpack(record)
    if record[:4] != _EOCD_SIG or comment_len != len(zf.comment):
        return f"the end record's comment does not end at the end of the file: {_TRUNCATED}"
    entries = zf.infolist()
    if count not in (_SEE_ZIP64[0], len(entries)):
        return f"central directory holds {len(entries)} entries, end record says {count}"
    if cd_offset not in (_SEE_ZIP64[1], zf.start_dir) or min((i.header_offset for i in entries), default=0) != 0:
        return "central directory does not end at the end record: bytes before the archive, file corrupt or rewritten"
    return None


def check_torch_zip(f: BinaryIO, size: int) -> ZipCheck:
    """Check that ``f`` (``size`` bytes) is a complete torch zip checkpoint.

    ``zipfile`` reads the end record (zip64 included) and the central directory, never the tensor
    data, so it is cheap enough to run on every poll. ``size`` comes from the caller's ``fstat`` so
    the check and the later hash see the same file.
    """
    if size == 0:
        return _fail("empty file")
    head = _read_at(f, 0, 4)
    # A 1-3 byte prefix of "PK\3\4" is a zip being written; an empty zip starts with its EOCD.
    if not (_LOCAL_SIG.startswith(head) or head == _EOCD_SIG):
        if _read_at(f, 0, len(_LEGACY_TORCH_HEAD)) == _LEGACY_TORCH_HEAD:
            return _fail("not a zip file: legacy (pre-1.6) torch format, cannot be checked for completeness")
        return _fail("not a zip file (legacy torch format or not a checkpoint)")
    if size < _EOCD.size:
        return _fail(f"only {size} bytes: {_TRUNCATED}")
    try:
        with zipfile.ZipFile(_Prefix(f, size)) as zf:
            problem = _end_record_problem(f, size, zf)
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as exc:
        return _fail(f"no valid end-of-central-directory record and central directory ({exc}): {_TRUNCATED}")
    if problem is not None:
        return _fail(problem)
    if not names:
        return _fail("not a torch checkpoint: the zip archive is empty")
    if "/" not in names[0]:
        return _fail("not a torch checkpoint: entries are not inside an archive folder")
    archive = names[0].split("/", 1)[0]
    present = set(names)
    if f"{archive}/data.pkl" not in present:
        return _fail(f"not a torch checkpoint: no {archive}/data.pkl")
    if f"{archive}/.data/version" not in present and f"{archive}/version" not in present:
        return _fail(f"not a torch checkpoint: no {archive}/version record")
    return ZipCheck(True)


# --- metadata without torch ------------------------------------------------------

# A data.pkl larger than this is not worth unpickling for a few metadata keys.
_MAX_PICKLE_BYTES = 256 * 1024 * 1024


class _Opaque:
    """Stands in for anything the unpickler will not build: tensors, storages, refused globals.

    Its subclasses are returned by ``find_class`` in place of the real callable,
    so REDUCE, NEWOBJ and BUILD on them run no foreign code.
    """

    label = "object"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


@functools.lru_cache(maxsize=1024)  # bounded: names come from untrusted pickles
def _placeholder(label: str) -> type[_Opaque]:
    return type("Placeholder", (_Opaque,), {"label": label})


class _NumpyDtype:
    """Just enough of ``numpy.dtype`` pickling (REDUCE args + BUILD state) to decode scalars."""

    def __init__(self, code: str, align: bool = False, copy: bool = True) -> None:
        self.code = code
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str):
            self.byteorder = state[1]


_NUMPY_STRUCT_CODES = {
    "f2": "e", "f4": "f", "f8": "d",
    "i1": "b", "i2": "h", "i4": "i", "i8": "q",
    "u1": "B", "u2": "H", "u4": "I", "u8": "Q",
    "b1": "?",
}  # fmt: skip


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """A numpy scalar (e.g. ``best_score`` from an evaluation) as a Python number."""
    code = dtype.code if isinstance(dtype, _NumpyDtype) else None
    if isinstance(code, str) and code in _NUMPY_STRUCT_CODES and isinstance(data, bytes):
        order = {"<": "<", ">": ">", "|": "<", "=": "="}.get(dtype.byteorder, "=")
        fmt = order + _NUMPY_STRUCT_CODES[code]
        if struct.calcsize(fmt) == len(data):
            return struct.unpack(fmt, data)[0]
    return _placeholder("numpy scalar")()


def _codecs_encode(text: Any, encoding: str = "utf-8") -> Any:
    """Protocol-2 pickles (torch's default) store ``bytes`` as ``_codecs.encode(str, 'latin1')``."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin-1")
    return _placeholder("refused _codecs.encode")()


def _plain_dict(*args: Any) -> dict[Any, Any]:
    """``defaultdict(factory)`` without its factory; SETITEMS fills it afterwards."""
    return {}


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): _plain_dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _MetaUnpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl without importing or calling anything outside ``_ALLOWED``.

    torch and numpy globals become inert placeholders (tensor data is never read:
    ``persistent_load`` returns a placeholder too); any other global is refused
    the same way, so a malicious pickle loads as data with holes instead of running.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol 2 (torch's default) writes Python 2 module names
            module = "builtins"
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module.split(".", 1)[0] in ("torch", "numpy"):
            return _placeholder(f"{module}.{name}")
        return _placeholder(f"refused {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return _placeholder("tensor data")()


def _json_safe(value: Any, active: set[int]) -> Any:
    """Plain JSON types only: placeholders become ``"<label>"``, tuples lists, keys strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, _Opaque) or (isinstance(value, type) and issubclass(value, _Opaque)):
        return f"<{value.label}>"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, complex):
        return str(value)
    if not isinstance(value, (dict, list, tuple, set, frozenset)):
        return f"<{type(value).__name__}>"
    if id(value) in active:
        return "<recursive>"
    active.add(id(value))
    try:
        if isinstance(value, dict):
            return {str(k): _json_safe(v, active) for k, v in value.items()}
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_json_safe(v, active) for v in items]
    finally:
        active.discard(id(value))


def read_checkpoint_meta(f: BinaryIO) -> dict[str, Any] | None:
    """The ``meta`` dict of an mmcv/mmengine checkpoint, JSON-safe, read without torch.

    Returns None when the file is not a readable torch zip, the pickle does not
    load, or there is no ``meta`` dict. Call it only after ``check_torch_zip``
    passed: it reads ``data.pkl`` (the object structure, not the tensor bytes).
    """
    try:
        with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            if not names or "/" not in names[0]:
                return None
            info = zf.getinfo(f"{names[0].split('/', 1)[0]}/data.pkl")
            if info.file_size > _MAX_PICKLE_BYTES:
                return None
            with zf.open(info) as pkl:
                checkpoint = _MetaUnpickler(pkl, encoding="utf-8").load()
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("meta"), dict):
            return None
        result: dict[str, Any] = _json_safe(checkpoint["meta"], set())
    except Exception:  # a malformed zip or pickle, or absurd nesting, is "no metadata", never a crash
        return None
    return result


def summarize_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The few meta keys worth putting in artifact metadata (the config string is not one)."""
    summary = {
        key: meta[key]
        for key in ("epoch", "iter", "mmdet_version", "mmcv_version", "mmengine_version")
        if key in meta
    }
    classes = meta.get("CLASSES")
    dataset_meta = meta.get("dataset_meta")
    if classes is None and isinstance(dataset_meta, dict):
        classes = dataset_meta.get("classes")
    if isinstance(classes, (list, tuple)):
        summary["CLASSES"] = list(classes)
    return summary


# --- hashing ---------------------------------------------------------------------


class ChangedWhileReading(OSError):
    """The file's size or mtime changed while it was hashed, so the digests are not of one version."""


@dataclass(frozen=True)
class Digests:
    """``md5_b64`` is what W&B manifests store; ``sha256_hex`` is our own dedup key."""

    size: int
    md5_b64: str
    md5_hex: str
    sha256_hex: str


def _unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ino) == (after.st_size, after.st_mtime_ns, after.st_ino)


def hash_file(f: BinaryIO, chunk: int = 8 * 1024 * 1024) -> Digests:
    """MD5 and SHA-256 of the whole file in one read, the two hashes running in parallel.

    Reads by offset (``preadv``) from the caller's open descriptor, so the file
    position does not matter and a pinned, since-unlinked file still works.
    hashlib drops the GIL on large buffers; each hash gets its own single-thread
    executor (updates stay in order) and a ring of buffers lets the next read
    overlap both, so wall time is about the slower hash (MD5) alone.
    Raises ``ChangedWhileReading`` if the file's size or mtime moved meanwhile.
    """
    fd = f.fileno()
    before = os.fstat(fd)
    if not stat.S_ISREG(before.st_mode):
        raise ValueError("hash_file needs a regular file")
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    buffers = [bytearray(chunk) for _ in range(3)]
    in_use: list[list[Future[None]]] = [[] for _ in buffers]
    offset = 0
    with ThreadPoolExecutor(1, "md5") as md5_pool, ThreadPoolExecutor(1, "sha256") as sha_pool:
        for i in itertools.count():
            slot = i % len(buffers)
            for job in in_use[slot]:
                job.result()
            n = os.preadv(fd, [buffers[slot]], offset)
            if n == 0:
                break
            view = memoryview(buffers[slot])[:n]
            in_use[slot] = [md5_pool.submit(md5.update, view), sha_pool.submit(sha256.update, view)]
            offset += n
        for jobs in in_use:
            for job in jobs:
                job.result()
    after = os.fstat(fd)
    if offset != before.st_size or not _unchanged(before, after):
        raise ChangedWhileReading(
            f"file changed while hashing: size {before.st_size} -> {after.st_size} (read {offset}), "
            f"mtime_ns {before.st_mtime_ns} -> {after.st_mtime_ns}"
        )
    md5_digest = md5.digest()
    return Digests(
        size=offset,
        md5_b64=base64.b64encode(md5_digest).decode("ascii"),
        md5_hex=md5_digest.hex(),
        sha256_hex=sha256.hexdigest(),
    )
