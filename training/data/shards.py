"""WebDataset-style tar shards of VT-Instruct samples.

A shard ``<prefix>-00000.tar`` holds, per sample, consecutive members sharing a key:
``<key>.json`` (the schema record), ``<key>.png`` or ``<key>.jpg`` (the image) and
optionally ``<key>.depth.npy`` (float32 metres, NaN unknown). Any WebDataset reader can
stream them; ``index_shard`` + ``read_entry`` give random access (tar is uncompressed).
Shards are written under a temporary name and renamed when complete, so a reader never
sees half a shard.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import cv2
import numpy as np

from refvlm_core.errors import InputError
from refvlm_core.sample import Sample

from refvlm_training.data.schema import (SampleError, parse_record_json, record_to_json,
                                         record_to_sample, sample_to_record)

IMAGE_SUFFIXES = ("png", "jpg", "jpeg")
DEPTH_SUFFIX = "depth.npy"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(sample_id: str) -> str:
    """Tar member key of a sample id (WebDataset keys must not contain dots)."""
    return _KEY_UNSAFE.sub("_", sample_id)


def encode_png(image: np.ndarray) -> bytes:
    """[H, W, 3] uint8 RGB -> PNG bytes."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f"could not encode an image of shape {image.shape} as PNG")
    return data.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    """Image file bytes -> [H, W, 3] uint8 RGB, or None when unreadable."""
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if array is None:
        return None
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Writes samples into ``<out_dir>/<prefix>-NNNNN.tar``, ``max_samples_per_shard`` each.

    Use as a context manager; ``close()`` returns the shard paths written.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", max_samples_per_shard: int = 1000) -> None:
        if max_samples_per_shard < 1:
            raise InputError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", prefix):
            raise InputError(f"shard prefix {prefix!r} may only hold letters, digits, '_' and '-'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples_per_shard = max_samples_per_shard
        self.count = 0
        self.shards: list[Path] = []
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open_next(self) -> None:
        self._finish_shard()
        path = self.out_dir / f"{self.prefix}-{len(self.shards):05d}.tar"
        self.shards.append(path)
        self._tar = tarfile.open(str(path) + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            os.replace(str(self.shards[-1]) + ".tmp", self.shards[-1])

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, sample: Sample, *, tasks: list[str] | None = None, source: dict[str, Any] | None = None,
              image_bytes: bytes | None = None, image_suffix: str = "png") -> str:
        """Store one sample; returns its key. ``image_bytes`` keeps an original file
        (e.g. a dataset's JPEG) instead of re-encoding ``sample.image`` as PNG."""
        key = sample_key(sample.id)
        if key in self._keys:
            raise InputError(f"duplicate sample id {sample.id!r} (key {key!r}); ids must be unique per dataset")
        if image_suffix not in IMAGE_SUFFIXES:
            raise InputError(f"image suffix {image_suffix!r} not one of {IMAGE_SUFFIXES}")
        if self._tar is None or self._in_shard >= self.max_samples_per_shard:
            self._open_next()
        depth_member = DEPTH_SUFFIX if sample.depth is not None else None
        record = sample_to_record(sample, image_suffix, depth_member, tasks=tasks, source=source)
        self._add(f"{key}.json", record_to_json(record))
        self._add(f"{key}.{image_suffix}", image_bytes if image_bytes is not None else encode_png(sample.image))
        if sample.depth is not None:
            self._add(f"{key}.{DEPTH_SUFFIX}", _npy_bytes(sample.depth))
        self._keys.add(key)
        self._in_shard += 1
        self.count += 1
        return key

    def close(self) -> list[Path]:
        self._finish_shard()
        return list(self.shards)


# ---------------------------------------------------------------------- reading

def list_shards(path: str | os.PathLike) -> list[Path]:
    """A shard file, or every ``*.tar`` in a directory, sorted; InputError when none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        return [path]
    if not path.is_dir():
        raise InputError(f"{path} is neither a .tar shard nor a directory of shards")
    shards = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
    if not shards:
        raise InputError(f"no .tar shards in {path}; write some with `refvlm data convert` or `refvlm data simworld`")
    return shards


@dataclass
class ShardEntry:
    """Where one sample's members lie in a shard: suffix -> (data offset, size)."""

    shard: Path
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, suffix = base.partition(".")
    return key, suffix


def index_shard(shard: str | os.PathLike) -> list[ShardEntry]:
    """Read only the tar headers of a shard: one entry per sample key, in file order."""
    shard = Path(shard)
    entries: list[ShardEntry] = []
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, suffix = _split_name(info.name)
                if not entries or entries[-1].key != key:
                    entries.append(ShardEntry(shard=shard, key=key))
                entries[-1].members[suffix] = (info.offset_data, info.size)
    except tarfile.TarError as error:
        raise InputError(f"{shard} is not a readable tar shard ({error}); write it again") from error
    return entries


def read_entry(handle: BinaryIO, entry: ShardEntry) -> dict[str, bytes]:
    """The members of one entry, read from an open shard file."""
    files = {}
    for suffix, (offset, size) in entry.members.items():
        handle.seek(offset)
        files[suffix] = handle.read(size)
    return files


def decode_files(key: str, files: dict[str, bytes]) -> Sample:
    """Members of one sample -> validated Sample; raises SampleError."""
    if "json" not in files:
        raise SampleError(key, "<json>", "schema", "no .json member for this key")
    record = parse_record_json(files["json"], key)
    sample_id = str(record.get("id", key))
    image_info = record.get("image") if isinstance(record.get("image"), dict) else {}
    suffix = image_info.get("member")
    if suffix not in files:
        raise SampleError(sample_id, "image", "unreadable_image", f"no .{suffix} member in the shard")
    image = decode_image(files[suffix])
    if image is None:
        raise SampleError(sample_id, "image", "unreadable_image", f"the .{suffix} member cannot be decoded")
    depth = None
    depth_info = record.get("depth")
    if depth_info:
        depth = _decode_depth(files.get(depth_info.get("member", "")), sample_id)
    return record_to_sample(record, image, depth)


def _decode_depth(data: bytes | None, sample_id: str) -> np.ndarray:
    if data is None:
        raise SampleError(sample_id, "depth", "unreadable_depth", "the depth member is missing")
    try:
        depth = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise SampleError(sample_id, "depth", "unreadable_depth", f"not a .npy array: {error}") from error
    if depth.ndim != 2:
        raise SampleError(sample_id, "depth", "unreadable_depth", f"depth must be [H, W], got {depth.shape}")
    return depth.astype(np.float32, copy=False)


def iter_shard(shard: str | os.PathLike) -> Iterator[tuple[ShardEntry, dict[str, bytes]]]:
    """Stream (entry, member bytes) of every sample of one shard, in file order."""
    entries = index_shard(shard)
    with open(shard, "rb") as handle:
        for entry in entries:
            yield entry, read_entry(handle, entry)


def read_samples(path: str | os.PathLike) -> Iterator[Sample]:
    """Every sample of a shard or directory, in order; raises on the first bad one."""
    for shard in list_shards(path):
        for entry, files in iter_shard(shard):
            yield decode_files(entry.key, files)


def read_sample(shard: str | os.PathLike, index: int) -> Sample:
    """The ``index``-th sample of one shard (for `refvlm data show`)."""
    entries = index_shard(shard)
    if not -len(entries) <= index < len(entries):
        raise InputError(f"{shard} holds {len(entries)} samples; index {index} is out of range")
    entry = entries[index]
    with open(shard, "rb") as handle:
        return decode_files(entry.key, read_entry(handle, entry))


def read_record(shard: str | os.PathLike, index: int) -> dict[str, Any]:
    """The raw JSON record of the ``index``-th sample (no validation)."""
    entry = index_shard(shard)[index]
    with open(shard, "rb") as handle:
        return parse_record_json(read_entry(handle, entry)["json"], entry.key)
