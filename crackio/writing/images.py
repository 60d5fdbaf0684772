"""One decoding truth for stored crops: what the packer stores for an input file, or why it skips it.

Every stored image is a 224x224 8-bit RGB JPEG that both backends (DALI's decoder,
torchvision's libjpeg-turbo) decode to the same pixels:

- An RGB JPEG of the right size without an EXIF rotation is stored byte for byte.
- EXIF orientation (tag 274, values 2-8) is applied and upright pixels are stored
  without the tag: DALI honours the tag and torchvision does not, so a stored tag
  would give the two backends different images (viewers and the proposal tools
  show the upright picture).
- Other modes keep their real dynamic range: 16-bit samples are scaled by 255/65535,
  32-bit integers within 0..65535 likewise, floats within [0, 1] by 255; a range
  that cannot be known (negative, larger, non-finite) is skipped, never clipped to a
  white or black crop. Transparency is composited over black (the fill rotation
  uses). Palette, grayscale, bilevel and CMYK go through Pillow's conversion.
- A JPEG that decodes only with warnings (corrupt or cut-short data that libjpeg
  fills with grey) is skipped: libjpeg-turbo is run in strict mode, whatever the
  caller's `PIL.ImageFile.LOAD_TRUNCATED_IMAGES`.
- Reasons say what the file is and what to do; they hold no memory addresses, so
  two packs of the same input write the same manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import threading
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from crackio.fsio import NotRegular, TooLarge, read_regular

EXIF_ORIENTATION = 0x0112  # TIFF/EXIF tag 274
ROTATING = range(2, 9)  # orientations that move pixels; 1 is upright, others are invalid and ignored
JPEG_SOI = b"\xff\xd8\xff"
MAX_PIXELS = 50_000_000  # a proposal crop is resized to 224x224: anything this large is not a crop
MAX_FILE_BYTES = 256 << 20  # read no further: a 50-megapixel PNG is ~150 MB, a 224x224 crop ~10 KB


class Prepared(NamedTuple):
    data: bytes | None  # the RGB JPEG to store; None: the file is skipped
    note: str  # "" = stored byte for byte; else what was converted, or why it was skipped
    digest: bytes  # BLAKE2b-128 of the source bytes (empty when unread), for the leakage report


def prepare(path: str, size: int = 224, quality: int = 95) -> Prepared:
    """Read and fully decode one input file: (JPEG bytes to store, note, digest) or (None, reason, digest).

    Never raises for bad content; only the reason differs. Thread-safe: Pillow and
    libjpeg-turbo release the GIL while decoding, so the packer runs this in threads.
    """
    try:
        # Never blocks on a path that became a named pipe since it was listed, never reads a device.
        data = read_regular(path, MAX_FILE_BYTES)
    except NotRegular:
        return Prepared(None, "not a regular file (a named pipe, socket or device): not read", b"")
    except TooLarge as e:
        return Prepared(None, _too_large(e.size), b"")
    except OSError as e:
        return Prepared(None, f"unreadable: {e.strerror or e}", b"")
    digest = hashlib.blake2b(data, digest_size=16).digest()
    if not data:
        return Prepared(None, "empty file (0 bytes): copy it again from its source or delete it", digest)
    with strict_pillow():  # held for every Pillow call: a PNG's getexif() already decodes the pixels
        data_out, note = _prepare(data, size, quality)
    return Prepared(data_out, note, digest)


def _too_large(size: int) -> str:
    return (
        f"{size / 2**20:.0f} MiB file: larger than any plausible crop (limit {MAX_FILE_BYTES >> 20} MiB), "
        f"not read; crop or downscale it"
    )


def _prepare(data: bytes, size: int, quality: int) -> tuple[bytes | None, str]:
    if data.startswith(JPEG_SOI) and (bits := jpeg_precision(data)) not in (None, 8):
        return None, f"{bits}-bit JPEG: not supported by Pillow/DALI; convert it to an 8-bit JPEG"
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, describe_unknown(data)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"unreadable image header ({_text(e)}): re-export the file"
    with img:
        fmt, mode, (w, h) = img.format, img.mode, img.size
        frames = getattr(img, "n_frames", 1)
        # A camera JPEG with an embedded second image (a preview, the other eye) opens as MPO: its first image is
        # the photo (CIPA DC-007), stored as a converted JPEG; other multi-frame files are ambiguous.
        if frames > 1 and fmt != "MPO":
            return None, (
                f"{fmt} with {frames} frames (animated or multi-page): a crop is one picture; export the "
                f"frame you mean as JPEG"
            )
        if w * h > MAX_PIXELS:
            return None, (
                f"{w}x{h} pixels: larger than any plausible crop (limit {MAX_PIXELS // 10**6} megapixels); "
                f"crop or downscale it"
            )
        try:
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - malformed EXIF: Pillow raises many kinds; re-encode without it
            orientation = -1
        if fmt == "JPEG":
            problem = jpeg_problem(data)
            if problem:
                return None, problem
            if mode == "RGB" and (w, h) == (size, size) and orientation not in ROTATING and orientation != -1:
                return data, ""  # the common case: bytes stored unchanged
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return None, f"{fmt} data is corrupt or truncated ({_text(e)}): re-export or re-crop the file"
        notes = [f"{fmt} {mode}" + (f", the first of its {frames} images kept" if fmt == "MPO" else "")]
        upright: Image.Image = img
        if orientation in ROTATING:
            upright = ImageOps.exif_transpose(img)
            notes.append(f"EXIF orientation {orientation} applied")
        elif orientation == -1:
            notes.append("unreadable EXIF dropped")
        rgb, why = to_rgb8(upright)
        if rgb is None:
            return None, why
        if why:
            notes.append(why)
        if rgb.size != (size, size):
            notes.append(f"{rgb.size[0]}x{rgb.size[1]} resized")
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality)  # no exif= argument: the tag is not carried over
        return out.getvalue(), " ".join(notes)


class _Strict:
    depth = 0  # holders inside strict_pillow()
    saved = False  # the caller's LOAD_TRUNCATED_IMAGES, restored when the last holder leaves


_strict = _Strict()
_strict_lock = threading.Lock()


@contextlib.contextmanager
def strict_pillow():
    """Hold Pillow's module-wide LOAD_TRUNCATED_IMAGES off (re-entrant, thread-safe).

    A caller's script may set it to True; then a cut-short PNG or JPEG loads with its
    missing rows filled in. The packer holds it off for its whole run; the caller's
    value is restored when the outermost holder leaves.
    """
    with _strict_lock:
        if _strict.depth == 0:
            _strict.saved = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict.depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict.depth -= 1
            if _strict.depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict.saved


def jpeg_problem(data: bytes) -> str:
    """ "" if libjpeg-turbo decodes the JPEG without a warning, else the reason to skip it."""
    try:
        # strict=True turns libjpeg's recoverable warnings ("Corrupt JPEG data: premature end of data
        # segment", grey rows filled in) into errors; Pillow and torchvision only print them, if that.
        simplejpeg.decode_jpeg(data, strict=True)
    except ValueError as e:
        return f"JPEG data is corrupt: decoder warning '{_text(e)}'; re-export or re-crop the file"
    return ""


def jpeg_precision(data: bytes) -> int | None:
    """Sample precision in bits from the JPEG's frame header (SOFn), or None if none is found.

    Read by hand because Pillow refuses a 12- or 16-bit JPEG as "cannot identify image
    file" and no installed library reports the precision of a file it cannot open.
    """
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:  # standalone markers, fill
            i += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0-15 but DHT, JPG, DAC
            return data[i + 4] if i + 4 < len(data) else None
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def to_rgb8(img: Image.Image) -> tuple[Image.Image | None, str]:
    """8-bit RGB with the mode's real dynamic range: (image, note) or (None, reason to skip)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img, ""
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(img)
        if not np.isfinite(values).all():
            return None, f"{mode} image with NaN or infinite pixels: fix or drop the file"
        lo, hi = values.min(), values.max()
        if mode == "F":
            if lo < 0 or hi > 1:
                return None, (
                    f"32-bit float image with values in [{lo:g}, {hi:g}]: only [0, 1] has a known "
                    f"scale; save it as 8-bit"
                )
            scaled, note = values * 255.0, "float [0, 1] scaled to 8 bits"
        else:
            if lo < 0 or hi > 65535:
                return None, (
                    f"{mode} integer image with values in [{lo}, {hi}]: only 0..65535 has a known "
                    f"scale; save it as 8- or 16-bit"
                )
            scaled, note = values.astype(np.float64) * (255.0 / 65535.0), "16-bit range scaled to 8 bits"
        gray = Image.fromarray(np.rint(scaled).astype(np.uint8))
        return gray.convert("RGB"), note
    if "A" in mode or mode.endswith("a") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB"), "transparency composited over black"
    try:
        return img.convert("RGB"), ""
    except ValueError:
        return None, f"Pillow cannot convert mode {mode} to RGB: save the file as an 8-bit RGB JPEG or PNG"


_KNOWN = (  # (prefix test, what the file is and what to do)
    (
        lambda d: d[4:12] in (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftypmif1", b"ftypmsf1"),
        "HEIC/HEIF image: Pillow cannot read it without the pillow-heif plugin; convert it to JPEG",
    ),
    (lambda d: d[4:12] == b"ftypavif", "AVIF image: convert it to JPEG"),
    (lambda d: d.startswith(b"%PDF"), "a PDF document, not an image: export the page as JPEG"),
    (
        lambda d: d.startswith(b"version https://git-lfs"),
        "a Git LFS pointer, not the image: run `git lfs pull` in the dataset's repository",
    ),
    (
        lambda d: d.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")),
        "an HTML page, not an image (a failed download?): download the file again",
    ),
    (lambda d: d.startswith(JPEG_SOI), "a JPEG whose header Pillow cannot parse: re-export the file"),
)


def describe_unknown(data: bytes) -> str:
    """What a file Pillow cannot identify is, in words a person can act on."""
    for test, reason in _KNOWN:
        if test(data):
            return reason
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file, not an image: move it out of the split folder"
    return f"not an image format Pillow can read (starts with bytes {data[:8].hex(' ')}): convert it to JPEG or PNG"


def _text(e: BaseException) -> str:
    # Library messages can carry object reprs ("<_io.BytesIO object at 0x7f...>"): never in a manifest.
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", str(e)) or type(e).__name__
