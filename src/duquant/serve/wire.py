"""The bytes between a policy server and its clients: openpi's msgpack + numpy format, and the image helpers
both ends of the wire apply (`openpi_client.image_tools`).

Format (wire-compatible with `openpi-client` 0.1.2 in both directions): every message is one msgpack value;
an ndarray travels as the map `{b"__ndarray__": True, b"data": <C-order bytes>, b"dtype": "<f4", b"shape":
[..]}` and a numpy scalar as `{b"__npgeneric__": True, b"data": <item>, b"dtype": "<f8"}` (keys are msgpack
bin). Object, void and complex dtypes are refused in both directions, so nothing but plain numbers crosses the
network. Decoded arrays are zero-copy views of the message and therefore read-only, as openpi's are.

Only numpy and msgpack are imported (PIL lazily, for the images), so the torch-free LIBERO client can use
this.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

REFUSED_DTYPE_KINDS = ("V", "O", "c")  # structured / object / complex


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in REFUSED_DTYPE_KINDS:
        raise ValueError(f"Unsupported dtype: {dtype} (object, void and complex arrays are not sent)")


def encode_numpy(obj):
    """msgpack `default` hook: numpy arrays and scalars to tagged maps; anything else is returned unchanged
    (msgpack then raises TypeError for types it cannot pack)."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {b"__ndarray__": True, b"data": obj.tobytes(order="C"), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def decode_numpy(obj: dict):
    """msgpack `object_hook`: tagged maps back to numpy; a size that does not match its shape is an error."""
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        _check_dtype(dtype)
        shape = tuple(int(s) for s in obj[b"shape"])
        data = obj[b"data"]
        expected = dtype.itemsize * math.prod(shape)
        if len(data) != expected:
            raise ValueError(
                f"ndarray of shape {shape} and dtype {dtype} needs {expected} bytes, got {len(data)}"
            )
        return np.ndarray(buffer=data, dtype=dtype, shape=shape)
    if b"__npgeneric__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        _check_dtype(dtype)
        return dtype.type(obj[b"data"])
    return obj


def Packer() -> msgpack.Packer:  # noqa: N802 (named like openpi_client.msgpack_numpy.Packer)
    """A reusable packer (one per connection: msgpack packers are not thread-safe)."""
    return msgpack.Packer(default=encode_numpy)


def packb(obj) -> bytes:
    return msgpack.packb(obj, default=encode_numpy)


def unpackb(data: bytes):
    return msgpack.unpackb(data, object_hook=decode_numpy)


# ---- images, as openpi_client.image_tools prepares them ----------------------------------------------------

def convert_to_uint8(img: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8 (truncating, as openpi does); uint8 passes through."""
    if np.issubdtype(img.dtype, np.floating):
        return (255 * img).astype(np.uint8)
    return img


def resize_with_pad(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """[..., H, W, C] uint8 -> [..., height, width, C]: PIL bilinear resize keeping the aspect ratio, then
    centred on black (tf.image.resize_with_pad, as openpi_client.image_tools does it). Already the right size:
    returned as is."""
    if images.shape[-3:-1] == (height, width):
        return images
    from PIL import Image

    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    out = []
    for im in flat:
        cur_h, cur_w = im.shape[:2]
        ratio = max(cur_w / width, cur_h / height)
        new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
        pil = Image.fromarray(np.ascontiguousarray(im)).resize((new_w, new_h), resample=Image.BILINEAR)
        canvas = Image.new(pil.mode, (width, height), 0)
        canvas.paste(pil, (max(0, int((width - new_w) / 2)), max(0, int((height - new_h) / 2))))
        out.append(np.asarray(canvas))
    stacked = np.stack(out)
    return stacked.reshape(*lead, *stacked.shape[-3:])


__all__ = [
    "Packer",
    "packb",
    "unpackb",
    "encode_numpy",
    "decode_numpy",
    "convert_to_uint8",
    "resize_with_pad",
]
