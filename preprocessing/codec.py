"""Image decode with NVIDIA nvImageCodec (nvJPEG, nvJPEG2000 on a GPU), chosen per transfer syntax.

pydicom's plugins decode every transfer syntax on the CPU and stay the reference. Where nvImageCodec can do the
work - JPEG (baseline, extended, lossless) and JPEG 2000 on a GPU; JPEG 2000 and 8-bit baseline JPEG with its
CPU back-ends - the compressed frame goes to nvImageCodec instead. Anything else (RLE, JPEG-LS, uncompressed,
multi-frame, colour, bit depths it cannot hold) stays with pydicom, and so does every frame nvImageCodec fails
on or answers with a shape or type that does not match the header: the result is the same either way, only the
decoder differs (``DecodedImage.decoder`` says which).

``[preprocessing] decode_backend``: ``auto`` (nvImageCodec on a GPU when both are present, pydicom otherwise),
``pydicom``, or ``nvimgcodec`` (also on a CPU, with its CPU back-ends: how CI checks the path against pydicom).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pydicom
from pydicom import uid
from pydicom.encaps import generate_frames

logger = logging.getLogger(__name__)

_JPEG = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1)
_J2K = (uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K)
# What each kind of device decodes; the rest goes to pydicom.
GPU_SYNTAXES = frozenset(_JPEG + _J2K)
CPU_SYNTAXES = frozenset((uid.JPEGBaseline8Bit, *_J2K))


def available() -> tuple[bool, str]:
    """(usable, why not) for nvImageCodec in this installation."""
    try:
        import nvidia.nvimgcodec  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return False, f"nvImageCodec is not installed ({type(exc).__name__}: {exc})"
    return True, ""


class NvImageDecoder:
    """Decodes single-frame grayscale images of the transfer syntaxes it handles; ``None`` means "use pydicom"."""

    def __init__(self, *, device_id: int | None) -> None:
        import nvidia.nvimgcodec as nvimgcodec

        self._nv = nvimgcodec
        self.device_id = device_id
        self.syntaxes = GPU_SYNTAXES if device_id is not None else CPU_SYNTAXES
        self.name = f"nvimgcodec-{'gpu' if device_id is not None else 'cpu'}"
        self._local = threading.local()  # one decoder per worker thread
        self._params = nvimgcodec.DecodeParams(
            allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED
        )
        self.fallbacks = 0
        self._decoder()  # fail at start-up, not on the first study

    def _decoder(self) -> Any:
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            nv = self._nv
            if self.device_id is None:
                decoder = nv.Decoder(
                    device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.BackendKind.CPU_ONLY)]
                )
            else:
                decoder = nv.Decoder(device_id=self.device_id)
            self._local.decoder = decoder
        return decoder

    def handles(self, ds: pydicom.Dataset) -> bool:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax not in self.syntaxes:
            return False
        bits = int(ds.get("BitsAllocated", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return frames == 1 and int(ds.get("SamplesPerPixel", 1)) == 1 and bits in (8, 16)

    def decode(self, ds: pydicom.Dataset) -> np.ndarray | None:
        """The stored pixel values as pydicom's ``pixel_array`` would give them, or None to fall back."""
        if not self.handles(ds):
            return None
        try:
            pixels = self._decode(ds)
        except Exception as exc:  # any codec failure: pydicom decodes this frame
            logger.debug("nvImageCodec could not decode an instance (%s); pydicom decodes it", exc)
            pixels = None
        if pixels is None:
            self.fallbacks += 1
        return pixels

    def _decode(self, ds: pydicom.Dataset) -> np.ndarray | None:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        image = self._decoder().decode(frame, params=self._params)
        if image is None:
            return None
        array = np.asarray(image.cpu())
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.shape != (rows, cols):
            return None
        bits = int(ds.BitsAllocated)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        if array.dtype.itemsize * 8 != bits or array.dtype.kind not in "ui":
            return None
        if signed:
            stored = int(ds.get("BitsStored", bits) or bits)
            if stored != bits:
                return None  # sign extension of a narrower stored value: leave it to pydicom
            array = array.view(np.int8 if bits == 8 else np.int16)
        else:
            array = array.view(np.uint8 if bits == 8 else np.uint16)
        return np.ascontiguousarray(array)


def select_decoder(setting: str, *, gpu: bool) -> tuple[NvImageDecoder | None, str]:
    """The image decoder for ``decode_backend`` (``gpu``: a CUDA device works); returns it (None: pydicom only)
    and a line for the start-up log."""
    if setting == "pydicom":
        return None, "pydicom (decode_backend = 'pydicom')"
    usable, reason = available()
    if setting == "nvimgcodec":
        if not usable:
            raise RuntimeError(f"decode_backend = 'nvimgcodec' but {reason}")
        decoder = NvImageDecoder(device_id=0 if gpu else None)
        return decoder, f"{decoder.name} for {len(decoder.syntaxes)} transfer syntaxes, pydicom for the rest"
    if not gpu:
        return None, "pydicom (no CUDA device)"
    if not usable:
        return None, f"pydicom ({reason})"
    try:
        decoder = NvImageDecoder(device_id=0)
    except Exception as exc:
        return None, f"pydicom (nvImageCodec on the GPU failed: {exc})"
    return decoder, f"{decoder.name} for {len(decoder.syntaxes)} transfer syntaxes, pydicom for the rest"
