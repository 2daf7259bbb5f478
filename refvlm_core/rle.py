"""COCO run-length encoding of binary masks, in numpy, compatible with pycocotools.

A mask ``[H, W]`` is read column by column (Fortran order); ``counts`` alternate runs of
0s and 1s, starting with 0s (a leading 0 when the first pixel is set). Two forms:

- uncompressed: ``{"size": [H, W], "counts": [int, ...]}``
- compressed:   ``{"size": [H, W], "counts": "<ascii string>"}`` (pycocotools gives bytes)

The compressed string stores each count (from the third on, as the difference to the
count two places earlier) in 5-bit groups, least significant first, each group as one
character ``48 + bits`` with bit 0x20 meaning "more groups follow" and the last group's
bit 0x10 being the sign.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from refvlm_core.errors import InputError


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """[H, W] bool -> run lengths (column-major, starting with a run of 0s)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    counts = runs.tolist()
    return [0] + counts if flat[0] else counts


def counts_to_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """Run lengths -> [H, W] bool; raises InputError when they do not add up to H * W."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    if (counts_arr < 0).any():
        raise InputError("RLE counts must be non-negative; the RLE is corrupt")
    if int(counts_arr.sum()) != height * width:
        raise InputError(f"RLE counts add up to {int(counts_arr.sum())} pixels but size {height}x{width} "
                         f"has {height * width}: the size or the counts are wrong")
    values = np.arange(len(counts_arr)) % 2 == 1
    flat = np.repeat(values, counts_arr)
    return flat.reshape((height, width), order="F")


def counts_to_string(counts: list[int]) -> str:
    """Run lengths -> the compressed ASCII form."""
    chars: list[str] = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: a negative value ends at -1
            more = value != -1 if group & 0x10 else value != 0
            chars.append(chr(48 + (group | 0x20 if more else group)))
    return "".join(chars)


def string_to_counts(text: str | bytes) -> list[int]:
    """The compressed ASCII form -> run lengths."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise InputError("RLE string ends in the middle of a count; the RLE is corrupt")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise InputError(f"RLE string has an invalid character {text[position]!r}")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    """[H, W] bool -> ``{"size": [H, W], "counts": str | list[int]}`` (JSON-ready)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"RLE encodes a 2-D mask [H, W], got shape {mask.shape}")
    counts = mask_to_counts(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])],
            "counts": counts_to_string(counts) if compressed else counts}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Compressed or uncompressed RLE dict -> [H, W] bool."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InputError('expected an RLE dict {"size": [H, W], "counts": ...}, '
                         f"got {type(rle).__name__} {str(rle)[:80]}")
    size = rle["size"]
    if len(size) != 2 or any(int(s) != s or s < 0 for s in size):
        raise InputError(f"RLE size must be [H, W] non-negative integers, got {size!r}")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = string_to_counts(counts)
    return counts_to_mask(list(counts), int(size[0]), int(size[1]))


def area(rle: dict[str, Any]) -> int:
    """Number of set pixels of an RLE mask."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = string_to_counts(counts)
    return int(sum(counts[1::2]))
