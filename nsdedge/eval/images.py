"""Image sets for evaluation: a directory of PNG/JPEG files or an .npy/.npz array, read lazily.

numpy + Pillow only. An .npy is memory-mapped (NSD's stimulus file for one subject is 982 x 425 x 425 x 3
uint8 for the test split and 4.8 GB for the training split); images are read a batch at a time and
converted to float32 in [0, 1], channels last. Never unpickles.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_SIDE = 8                        # smaller images make the metrics' windows meaningless (NaN SSIM)
_NUMBER = re.compile(r"(\d+)$")


class ImageSet:
    """N images addressed by an index (a row of an array, or the number in a file name).

    `keys` are the indices, in order; `read(keys)` gives float32 (len(keys), H, W, 3) in [0, 1].
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._array = None
        self._files: dict[int, Path] = {}
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or directory")
        if self.path.is_dir():
            self._open_dir()
        else:
            self._open_array()

    # -- opening ------------------------------------------------------------------------------------------
    def _open_dir(self) -> None:
        files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{self.path}: holds no .png or .jpg images")
        numbered = {p: _NUMBER.search(p.stem) for p in files}
        if all(numbered.values()):
            # `nsdedge run` writes 0000.png, 0001.png, ...: the number is the trial, i.e. the stimulus row
            for p, m in numbered.items():
                i = int(m.group(1))
                if i in self._files:
                    raise InputError(f"{self.path}: {self._files[i].name} and {p.name} both carry number {i}")
                self._files[i] = p
        else:
            self._files = dict(enumerate(files))      # no numbers: sorted order
        self.keys = sorted(self._files)

    def _open_array(self) -> None:
        from ..voxels import read_array

        arr = read_array(self.path, what="image")       # .npy memory-mapped; .npz with one array; never unpickled
        if arr.ndim == 3:                             # grayscale (N, H, W)
            pass
        elif arr.ndim != 4 or (arr.shape[-1] != 3 and arr.shape[1] != 3):
            raise InputError(f"{self.path}: images must be (N, H, W, 3), (N, 3, H, W) or (N, H, W); "
                             f"got shape {arr.shape}")
        if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(f"{self.path}: images must be uint8 (0-255) or float (0-1), got {arr.dtype}")
        if len(arr) == 0:
            raise InputError(f"{self.path}: holds no images")
        side = arr.shape[1:3] if arr.ndim == 3 or arr.shape[-1] == 3 else arr.shape[2:4]
        if min(side) < MIN_SIDE:
            raise InputError(f"{self.path}: images of {side[0]}x{side[1]} pixels; they must be at least "
                             f"{MIN_SIDE}x{MIN_SIDE}")
        self._array = arr
        self.keys = list(range(len(arr)))

    # -- reading ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def has(self, key: int) -> bool:
        return key in self._files if self._array is None else 0 <= key < len(self._array)

    def read(self, keys) -> np.ndarray:
        """float32 (len(keys), H, W, 3) in [0, 1]."""
        if self._array is None:
            images = [self._read_file(self._files[k]) for k in keys]
            if len({im.shape for im in images}) > 1:
                (a, ia), (b, ib) = [(self._files[k].name, im.shape[:2]) for k, im in zip(keys, images)
                                    if im.shape != images[0].shape or k == keys[0]][:2]
                raise InputError(f"{self.path}: images differ in size ({a} {ia[0]}x{ia[1]}, {b} {ib[0]}x{ib[1]})")
            return np.stack(images)
        a = np.asarray(self._array[np.asarray(keys)])   # copies only these rows out of the memory map
        if a.ndim == 3:
            a = np.repeat(a[..., None], 3, axis=-1)
        elif a.shape[-1] != 3:
            a = a.transpose(0, 2, 3, 1)
        if a.dtype == np.uint8:
            return a.astype(np.float32) / 255.0
        a = a.astype(np.float32)
        if not np.isfinite(a).all() or a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise InputError(f"{self.path}: float images must lie in [0, 1] (found {a.min():.3g}..{a.max():.3g} "
                             f"or NaN/Inf)")
        return np.clip(a, 0.0, 1.0)

    def check(self, keys) -> None:
        """What read(keys) would refuse, found before any work (an error then is the only line the command says):
        each file's header (readable, not a decompression bomb, not 32-bit, big enough, one size for all), or a
        float array's rows in [0, 1]. A file damaged past its header is still found as it is read."""
        keys = list(keys)
        if self._array is None:
            sizes = {}
            for k in keys:
                with _opened(self._files[k]) as im:
                    sizes.setdefault(im.size, self._files[k].name)
                if len(sizes) > 1:
                    (a, (wa, ha)), (b, (wb, hb)) = [(name, size) for size, name in sizes.items()]
                    raise InputError(f"{self.path}: images differ in size ({a} {ha}x{wa}, {b} {hb}x{wb})")
        elif self._array.dtype != np.uint8:
            for i in range(0, len(keys), 256):
                self.read(keys[i:i + 256])

    def _read_file(self, path: Path) -> np.ndarray:
        with _opened(path) as im:
            try:
                im.load()
            except (OSError, SyntaxError, ValueError) as e:                 # truncated, or damaged data
                raise InputError(f"{path}: not a readable image ({first_line(e)})") from None
            if _sixteen_bit_grey(im):                                       # its own scale, not clipped
                grey = np.asarray(im, dtype=np.float32) / 65535.0
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0

    def batches(self, keys, size: int = 32):
        keys = list(keys)
        for i in range(0, len(keys), size):
            yield self.read(keys[i:i + size])


@contextlib.contextmanager
def _opened(path: Path):
    """An image file with its header read (Pillow decodes the pixels only on load()), or InputError: unreadable,
    over Pillow's decompression-bomb limit (its warning as well as its error), 32-bit, or under MIN_SIDE."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{path}: not a readable image ({first_line(e)})") from None
    with im:
        if im.mode in ("I", "F") and not _sixteen_bit_grey(im):
            raise InputError(f"{path}: a {im.mode!r} (32-bit) image; save it as 8- or 16-bit RGB or grey")
        if min(im.size) < MIN_SIDE:
            raise InputError(f"{path}: an image of {im.size[1]}x{im.size[0]} pixels; images must be at least "
                             f"{MIN_SIDE}x{MIN_SIDE}")
        yield im


def _sixteen_bit_grey(im) -> bool:
    """A 16-bit grey image: Pillow's mode I;16 (from 10.3), or I for a PNG (before; a PNG has no 32-bit mode)."""
    return im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")


def pair_keys(recons: ImageSet, reference: ImageSet) -> list[int]:
    """The indices evaluated: every reconstruction's index must name an image of the reference set."""
    missing = [k for k in recons.keys if not reference.has(k)]
    if missing:
        raise InputError(f"{recons.path}: {len(missing)} reconstruction(s) have no image in {reference.path} "
                         f"(first: index {missing[0]}; the reference has {len(reference)})")
    if len(recons.keys) < 2:
        raise InputError(f"{recons.path}: need at least 2 images to evaluate, found {len(recons.keys)}")
    return list(recons.keys)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> (size, size, C), Pillow bilinear (antialiased when shrinking), per channel
    in float32 mode, so nothing is rounded to 8 bits on the way."""
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F")
                        .resize((size, size), Image.BILINEAR)) for c in range(image.shape[-1])]
    return np.stack(chans, axis=-1)


def contact_sheet(stimuli: np.ndarray, recons: np.ndarray, columns: int = 8, thumb: int = 128,
                  gap: int = 4) -> np.ndarray:
    """uint8 picture: for each group of `columns` images, a row of stimuli above a row of reconstructions."""
    n = len(stimuli)
    rows = -(-n // columns)
    cell = thumb + gap
    sheet = np.full((rows * (2 * cell + gap) + gap, min(n, columns) * cell + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = gap + r * (2 * cell + gap), gap + c * cell
        for j, img in enumerate((stimuli[i], recons[i])):
            t = np.clip(resize(img, thumb) * 255 + 0.5, 0, 255).astype(np.uint8)
            sheet[y + j * cell:y + j * cell + thumb, x:x + thumb] = t
    return sheet
