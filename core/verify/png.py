"""A dependency-free PNG writer (zlib + struct, 8-bit RGB) and a labelled frame strip.

The strip lets a person see at a glance whether the artifacts' video looks like the
PyTorch one: one row per video, the same evenly spaced frames in every row.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_RGB = 2  # IHDR colour type: truecolour, no alpha


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 over type and data."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(image: np.ndarray) -> bytes:
    """Encode an ``[H, W, 3]`` uint8 array as an 8-bit RGB PNG (no filtering, zlib level 9).

    Raises ValueError for any other shape or dtype, or an empty image.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"cannot encode an empty image ({height}x{width})")
    # every scanline starts with its filter type; 0 = None
    rows = np.concatenate(
        [np.zeros((height, 1), dtype=np.uint8), image.reshape(height, width * 3)], axis=1
    )
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_RGB, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(np.ascontiguousarray(rows).tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write ``image`` (see :func:`encode_png`) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    data = encode_png(image)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Map [-1, 1] to 0..255 (rounded), clipping values outside the range; NaN becomes 0."""
    scaled = (np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-1.0) + 1.0) * 127.5
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def frame_indices(num_frames: int, frames: int) -> list[int]:
    """``min(frames, num_frames)`` evenly spaced frame indices, ascending: the first frame,
    and the last one too when more than one index is asked for."""
    if num_frames < 1 or frames < 1:
        raise ValueError(f"need at least one frame, got num_frames={num_frames}, frames={frames}")
    count = min(frames, num_frames)
    return [int(i) for i in np.rint(np.linspace(0, num_frames - 1, count))]


def frame_strip(videos: Mapping[str, np.ndarray], path: Path, frames: int = 8) -> np.ndarray:
    """Write a grid of video frames to ``path`` as a PNG and return the image [H, W, 3].

    Rows are the videos in the mapping's order (e.g. ``{"pytorch": ..., "coreml": ...}``
    gives PyTorch on top); the labels only fix that order, no text is drawn. Every video
    is ``[3, F, H, W]`` with values in [-1, 1] (clipped outside) and all share one shape;
    columns are the same :func:`frame_indices` frames of each video, left to right, with
    no gaps, so the image is ``rows*H`` by ``columns*W`` pixels. Raises ValueError for no
    videos or mismatched shapes.
    """
    if not videos:
        raise ValueError("frame_strip needs at least one video")
    arrays = [np.asarray(v) for v in videos.values()]
    shape = arrays[0].shape
    if len(shape) != 4 or shape[0] != 3:
        raise ValueError(f"videos must be [3, F, H, W], got {shape}")
    for label, video in zip(videos, arrays, strict=True):
        if video.shape != shape:
            raise ValueError(f"video {label!r} has shape {video.shape}, expected {shape}")
    columns = frame_indices(shape[1], frames)
    # [3, F, H, W] -> pick frames -> [H, columns*W, 3] per row, rows stacked vertically
    rows = [np.concatenate([v[:, i].transpose(1, 2, 0) for i in columns], axis=1) for v in arrays]
    image = to_uint8(np.concatenate(rows, axis=0))
    write_png(path, image)
    return image
