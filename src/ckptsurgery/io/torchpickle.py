"""The pickle inside a torch archive, read and written without torch.

Reading: :func:`load_refs` unpickles ``data.pkl`` with an unpickler of our own that knows only
the weights-only vocabulary a state dict needs: ``collections.OrderedDict``, the storage
types, ``torch._utils._rebuild_tensor_v2`` / ``_v3`` / ``_rebuild_parameter`` and torch dtypes
(plus ``set``, ``complex`` and ``_codecs.encode``, which weights-only loading allows too).
Tensors come back as :class:`TensorRef` stand-ins (storage key, offset, shape, strides, dtype)
and no tensor byte is read. Any other global, a persistent id of another shape or a tensor
with extra state raises :class:`Unsupported`: the caller then goes through ``torch.load``
(weights-only), which decides. Nothing here imports anything a pickle names: ``find_class``
hands out only the stand-ins below.

Writing: :func:`dump_state_dict` emits the protocol-2 pickle ``torch.save`` would write for a
flat ``dict`` of tensors, opcode by opcode (pickling the stand-ins with :mod:`pickle` would
import torch to check the globals' identity).
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# torch dtype name -> bytes per element, for every dtype a storage record can be written in
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex128": 16, "complex64": 8,
    "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}  # fmt: skip
# the legacy typed storage class of a dtype (torch.save writes these for the older dtypes)
STORAGE_CLASS: dict[str, str] = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
    "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "bfloat16": "BFloat16Storage", "complex128": "ComplexDoubleStorage",
    "complex64": "ComplexFloatStorage",
}  # fmt: skip
_STORAGE_DTYPE = {cls: dtype for dtype, cls in STORAGE_CLASS.items()}


class Unsupported(Exception):
    """The pickle needs more than the stand-ins understand; use ``torch.load`` instead."""


# The objects an unpickler hands out are frozen and slotted: a pickle's BUILD opcode sets
# attributes on whatever is on its stack, and these are shared by every load in the process
# (or checked once, like a storage's size) -- a file must not change how the next is read.
def _no_state(self: object, state: object) -> None:
    # in each class itself: a frozen dataclass with slots otherwise gets a __setstate__ that
    # sets its fields regardless of frozen
    raise Unsupported(f"a pickle that sets the state of {type(self).__name__}")


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: str  # "uint8" for UntypedStorage
    untyped: bool = False
    __setstate__ = _no_state


@dataclass(frozen=True, slots=True)
class _DType:
    name: str
    __setstate__ = _no_state


@dataclass(frozen=True, slots=True)
class StorageRef:
    key: str
    dtype: str  # the storage's element type (uint8 when untyped)
    numel: int  # in elements of ``dtype``
    __setstate__ = _no_state

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


class TensorRef:
    """A tensor as the pickle describes it; its bytes stay in the archive.

    Its sizes and layout are worked out once, here: a checkpoint may hold 10**5 tensors, and
    every step (selecting, planning, copying, verifying) asks for them again.
    """

    __slots__ = (
        "dtype",
        "is_contiguous",
        "is_parameter",
        "itemsize",
        "nbytes",
        "numel",
        "offset",
        "shape",
        "storage",
        "stride",
        "whole_storage",
    )

    def __init__(
        self,
        storage: StorageRef,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        dtype: str,
    ) -> None:
        self.storage = storage
        self.offset = offset  # in elements of ``dtype``
        self.shape = shape
        self.stride = stride
        self.dtype = dtype
        self.is_parameter = False
        self.numel: int = math.prod(shape)
        self.itemsize: int = ITEMSIZE[dtype]
        self.nbytes: int = self.numel * self.itemsize
        # C-contiguous, by torch's rule (a dimension of size 1 may have any stride)
        self.is_contiguous: bool = self.numel == 0 or _c_contiguous(shape, stride)
        # contiguous and exactly covering its storage: its bytes are the storage record
        self.whole_storage: bool = (
            self.is_contiguous and offset == 0 and self.nbytes == storage.nbytes
        )

    def __setstate__(self, state: object) -> None:
        raise Unsupported("a tensor with Python attributes")

    @property
    def byte_offset(self) -> int:
        return self.offset * self.itemsize

    def identity(self) -> tuple[object, ...] | None:
        """What makes two names one tied tensor: same storage, same view, same dtype."""
        if self.numel == 0:
            return None
        return (self.storage.key, self.offset, self.shape, self.stride, self.dtype)


def _c_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    if len(shape) == 1:  # most tensors of a big state dict (biases, norms)
        return shape[0] == 1 or stride[0] == 1
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _int_tuple(x: object) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(v) is int and v >= 0 for v in x):
        raise Unsupported("sizes and strides must be tuples of non-negative integers")
    return x


def _tensor(
    storage: object, offset: object, size: object, stride: object, dtype: str | None
) -> TensorRef:
    if not isinstance(storage, StorageRef) or type(offset) is not int or offset < 0:
        raise Unsupported("a tensor rebuilt from something other than a storage")
    shape, strides = _int_tuple(size), _int_tuple(stride)
    if len(shape) != len(strides):
        raise Unsupported("sizes and strides of different lengths")
    t = TensorRef(storage, offset, shape, strides, dtype or storage.dtype)
    if t.numel:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if (last + 1) * t.itemsize > storage.nbytes:
            raise Unsupported("a tensor that reaches past its storage")
    return t


def _plain(requires_grad: object, hooks: object, metadata: object) -> None:
    if type(requires_grad) is not bool:
        raise Unsupported("requires_grad is not a bool")
    if not (isinstance(hooks, OrderedDict) and not hooks):
        raise Unsupported("a tensor with backward hooks")
    if metadata:  # conjugate / negative bits and the like change what the bytes mean
        raise Unsupported("a tensor with metadata")


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    metadata: object = None,
) -> TensorRef:
    _plain(requires_grad, hooks, metadata)
    return _tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v3(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    dtype: object,
    metadata: object = None,
) -> TensorRef:
    _plain(requires_grad, hooks, metadata)
    if not isinstance(dtype, _DType) or not isinstance(storage, StorageRef):
        raise Unsupported("_rebuild_tensor_v3 without a dtype")
    return _tensor(storage, offset, size, stride, dtype.name)


def _rebuild_parameter(data: object, requires_grad: object, hooks: object) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise Unsupported("a parameter that wraps no tensor")
    _plain(requires_grad, hooks, None)
    data.is_parameter = True
    return data


def _encode(text: object, encoding: object = "utf-8") -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Unsupported("_codecs.encode beyond bytes")
    return text.encode("latin1")


class Sealed:
    """A function as an unpickler hands it out: callable, with no attribute a pickle's BUILD
    could set (a plain function's ``__dict__`` and ``__defaults__`` are writable)."""

    __slots__ = ("_fn",)
    _fn: Any

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: object) -> None:
        raise Unsupported(f"a pickle that sets attributes on {self._fn.__name__}")

    def __repr__(self) -> str:
        return f"Sealed({self._fn.__name__})"


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): Sealed(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): Sealed(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): Sealed(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _StorageType("uint8", untyped=True),
    ("builtins", "set"): set,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): Sealed(_encode),
}
for _dtype, _cls in STORAGE_CLASS.items():
    _GLOBALS["torch", _cls] = _GLOBALS["torch.cuda", _cls] = _StorageType(_dtype)
for _dtype in ITEMSIZE:
    _GLOBALS["torch", _dtype] = _DType(_dtype)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 spells Python 3 names the Python 2 way ("__builtin__ set")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _GLOBALS.get((module, name))
        if found is None:
            raise Unsupported(f"global {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise Unsupported("a persistent id other than a storage")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str):
            raise Unsupported("a storage of an unknown type")
        if type(numel) is not int or numel < 0:
            raise Unsupported("a storage of negative size")
        # torch keeps the first declaration of a key, whatever later references say
        found = self.storages.get(key)
        if found is None:
            found = self.storages[key] = StorageRef(key, kind.dtype, numel)
        return found


_OPCODES: dict[int, list[int]] = {}
_FRAME, _STOP, _LONG_BINPUT, _NOT_OPCODE, _TOO_NEW = -6, -3, -4, -99, -98


def _opcode_table(protocol: int) -> list[int]:
    """Per opcode byte: its argument's fixed length (>= 0), -1 up to a newline, -2/-5/-9 a
    1/4/8-byte length then that many bytes; or one of the markers above."""
    table = _OPCODES.get(protocol)
    if table is None:
        import pickletools

        table = [_NOT_OPCODE] * 256
        prefixed = {pickletools.TAKEN_FROM_ARGUMENT1: -2, pickletools.TAKEN_FROM_ARGUMENT4: -5,
                    pickletools.TAKEN_FROM_ARGUMENT4U: -5, pickletools.TAKEN_FROM_ARGUMENT8U: -9}  # fmt: skip
        for op in pickletools.opcodes:
            n = op.arg.n if op.arg is not None else 0
            table[ord(op.code)] = n if n >= 0 else prefixed.get(n, -1)
            if op.proto > protocol:
                table[ord(op.code)] = _TOO_NEW
        table[ord(".")], table[ord("r")] = _STOP, _LONG_BINPUT
        if protocol >= 4:
            table[0x95] = _FRAME
        _OPCODES[protocol] = table
    return table


def pickle_hazard(data: bytes, *, protocol: int) -> str | None:
    """What makes ``data`` unsafe to hand to the C unpickler, or None.

    Its opcodes are walked, never run: a memo index past the pickle's length (the C
    unpickler sizes its memo array by the largest index: ``LONG_BINPUT 4294967295`` in a
    10-byte pickle allocates and zeroes 64 GB; a pickler numbers its memo from 0), an opcode
    of a protocol above ``protocol``, and an opcode that runs past the end of its frame
    (the C unpickler then fails with a bogus MemoryError and a bytearray freed while still
    exported). A merely malformed pickle passes here and fails in the unpickler.
    """
    table, find = _opcode_table(protocol), data.find
    limit = end = len(data)
    frame_end = 0  # where the current frame ends (0: not in a frame)
    i = 0
    while i < end:
        if frame_end and i >= frame_end:
            if i > frame_end:
                return "an opcode that runs past the end of its frame"
            frame_end = 0
        op = data[i]
        n = table[op]
        i += 1
        if n >= 0:
            i += n
        elif n == _LONG_BINPUT:
            if int.from_bytes(data[i : i + 4], "little") > limit:
                return "a memo index past the end of the pickle"
            i += 4
        elif n == -1:  # the argument runs up to a newline (two lines for GLOBAL and INST)
            j = find(b"\n", i)
            if op in (0x63, 0x69) and j >= 0:
                j = find(b"\n", j + 1)
            if j < 0:
                return None
            if op == 0x70:  # PUT, in decimal digits
                digits = data[i:j]
                if len(digits) > 20 or (digits.isdigit() and int(digits) > limit):
                    return "a memo index past the end of the pickle"
            i = j + 1
        elif n == _FRAME:
            if frame_end:
                return "a frame that starts inside another"
            frame_end = i + 8 + int.from_bytes(data[i : i + 8], "little")
            i += 8
        elif n == _STOP:
            return None  # the unpickler reads no further
        elif n == _TOO_NEW:
            return f"an opcode of pickle protocol > {protocol} ({data[i - 1 : i]!r})"
        elif n == _NOT_OPCODE:
            return None  # the unpickler refuses it before anything else happens
        else:
            k = -n - 1  # bytes of the length field
            i += k + int.from_bytes(data[i : i + k], "little")
    if frame_end and i > frame_end:
        return "an opcode that runs past the end of its frame"
    return None


@dataclass(frozen=True)
class Loaded:
    root: object
    storages: dict[str, StorageRef]


def load_refs(data: bytes) -> Loaded:
    """Unpickle ``data.pkl`` into plain containers and :class:`TensorRef` stand-ins.

    Raises :class:`Unsupported` for anything beyond the vocabulary, and for any pickle the
    unpickler cannot read (``torch.load`` then gives the error its users know).
    """
    if not data.startswith(b"\x80\x02"):
        # torch.save writes protocol 2; torch's weights-only unpickler refuses the opcodes of
        # later protocols, so such a file goes to it and gets its verdict.
        raise Unsupported("a pickle protocol other than 2")
    hazard = pickle_hazard(data, protocol=2)
    if hazard:  # torch's own (pure Python) unpickler then decides
        raise Unsupported(f"a pickle with {hazard}")
    unpickler = _Unpickler(data)
    try:
        root = unpickler.load()
    except Unsupported:
        raise
    except Exception as e:  # malformed input: let torch's reader say what is wrong
        raise Unsupported(f"{type(e).__name__}: {e}") from None
    return Loaded(root, unpickler.storages)


# --- selecting the state dict among stand-ins (as ckptsurgery.state_dict does for tensors) ---


def ref_type_name(obj: object) -> str:
    if isinstance(obj, TensorRef):
        return "torch.nn.parameter.Parameter" if obj.is_parameter else "torch.Tensor"
    cls = type(obj)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


# --- writing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """One entry of a flat state dict to pickle: a contiguous tensor over a whole storage."""

    name: str
    key: str  # the storage record's key (data/<key>)
    dtype: str
    shape: tuple[int, ...]


def _unicode(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _tuple(items: list[bytes]) -> bytes:
    if not items:
        return b")"
    return b"(" + b"".join(items) + b"t"


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def dump_state_dict(entries: list[StoredTensor]) -> bytes:
    """The ``data.pkl`` torch.save writes for ``{name: tensor}`` (protocol 2).

    Tensors of one key share one storage (tied names); each covers its storage whole.
    """
    out = [b"\x80\x02}q\x00"]  # PROTO 2, EMPTY_DICT, BINPUT 0
    if entries:
        out.append(b"(")
    memo: dict[bytes, int] = {}

    def glob(module: str, name: str) -> bytes:
        text = f"c{module}\n{name}\n".encode()
        if text in memo:
            return b"h" + bytes([memo[text]]) if memo[text] < 256 else _long_get(memo[text])
        memo[text] = len(memo) + 1
        return text + _put(memo[text])

    for e in entries:
        item = ITEMSIZE[e.dtype]
        numel = math.prod(e.shape)
        legacy = STORAGE_CLASS.get(e.dtype)
        rebuild = "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3"
        storage_type = glob("torch", legacy) if legacy else glob("torch.storage", "UntypedStorage")
        storage_numel = numel if legacy else numel * item
        pid = _tuple(
            [
                _unicode("storage"),
                storage_type,
                _unicode(e.key),
                _unicode("cpu"),
                _int(storage_numel),
            ]
        )
        args = [
            pid + b"Q",  # BINPERSID
            _int(0),
            _tuple([_int(n) for n in e.shape]),
            _tuple([_int(s) for s in contiguous_strides(e.shape)]),
            b"\x89",  # NEWFALSE: requires_grad
            glob("collections", "OrderedDict") + b")R",  # backward hooks: OrderedDict()
        ]
        if not legacy:
            args.append(glob("torch", e.dtype))
        out.append(_unicode(e.name) + glob("torch._utils", rebuild) + _tuple(args) + b"R")
    if entries:
        out.append(b"u")  # SETITEMS
    out.append(b".")
    return b"".join(out)


def _put(i: int) -> bytes:
    return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def _long_get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)
