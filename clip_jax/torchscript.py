"""Read the tensors of a TorchScript archive (`torch.jit.save`) without running any of it.

OpenAI released CLIP as TorchScript archives. `torch.jit.load` runs the archive's TorchScript
code while loading (a scripted `__setstate__` of any module or class in it can write files,
e.g. through `torch.from_file(path, shared=True)`), and `torch.load(weights_only=True)` refuses
TorchScript archives. This reader needs neither and imports no torch:

  * only `<archive>/data.pkl` (the pickled module tree) and `<archive>/data/<key>` (raw tensor
    storages) are read; `code/`, `constants.pkl` and every other entry are never opened;
  * data.pkl is unpickled with `pickle.Unpickler.find_class` restricted to the handful of
    globals that describe tensors (`torch._utils._rebuild_tensor_v2`, the `torch.*Storage`
    dtype tags, `collections.OrderedDict`) and TorchScript's list/tag helpers, each replaced by
    a NumPy implementation here; TorchScript classes (`__torch__.*`) become inert records of
    their pickled attributes, so no `__setstate__` of theirs exists to be called; any other
    global is refused. Every way the pickle format reaches a callable (GLOBAL, STACK_GLOBAL,
    INST, OBJ, EXT*) goes through `find_class` (Python's documented way to restrict unpickling);
  * tensors are rebuilt as NumPy arrays after checking that size/stride/offset stay inside their
    storage.

The result is the module's attributes that hold tensors, named like `state_dict()` keys
(`visual.conv1.weight`). For traced archives (OpenAI's) that is exactly `state_dict()`: tracing
keeps only parameters and buffers. A scripted module may also keep plain tensor attributes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import zipfile
from typing import Any

import numpy as np


class UnsafeArchiveError(ValueError):
    """The archive holds something this reader does not rebuild (it never runs code)."""


def _storage_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes  # a jax dependency

    return {
        "DoubleStorage": np.dtype(np.float64),
        "FloatStorage": np.dtype(np.float32),
        "HalfStorage": np.dtype(np.float16),
        "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
        "LongStorage": np.dtype(np.int64),
        "IntStorage": np.dtype(np.int32),
        "ShortStorage": np.dtype(np.int16),
        "CharStorage": np.dtype(np.int8),
        "ByteStorage": np.dtype(np.uint8),
        "BoolStorage": np.dtype(np.bool_),
        "ComplexFloatStorage": np.dtype(np.complex64),
        "ComplexDoubleStorage": np.dtype(np.complex128),
    }


class _StorageType:
    """Stands for `torch.FloatStorage` & co. in data.pkl: only its dtype matters."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __setstate__(self, state: Any) -> None:
        # Without this, pickle's BUILD could overwrite `dtype` (slot state) with any object.
        raise UnsafeArchiveError(f"data.pkl modifies the storage type {self.name}")


class ScriptObject:
    """An inert record of a TorchScript object (`__torch__.*` class) from data.pkl.

    `qualified_name` is the TorchScript class ("__torch__.torch.nn.modules.linear.Linear"),
    `state` what the archive pickled for it: a dict of attributes for plain modules, anything
    else when the class defines `__getstate__` (its `__setstate__` is never run).
    """

    qualified_name = "__torch__"

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD: record, run nothing
        self.state = state


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """NumPy stand-in for `torch._utils._rebuild_tensor_v2`: a bounds-checked strided copy."""
    del requires_grad, backward_hooks, metadata  # autograd flags: irrelevant to the values
    if not isinstance(storage, np.ndarray):
        raise UnsafeArchiveError(
            f"a tensor's storage is a {type(storage).__name__}, not a storage record"
        )
    ints = [storage_offset, *tuple(size), *tuple(stride)]
    if (
        not all(type(v) is int for v in ints)
        or len(tuple(size)) != len(tuple(stride))
        or min(ints, default=0) < 0
    ):
        raise UnsafeArchiveError(
            f"a tensor has an invalid layout: offset {storage_offset!r}, "
            f"size {size!r}, stride {stride!r}"
        )
    size, stride = tuple(size), tuple(stride)
    if 0 in size:
        return np.zeros(size, storage.dtype)
    # as_strided does not check bounds: the last element must lie inside the storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise UnsafeArchiveError(
            f"a tensor of size {size} (stride {stride}, offset "
            f"{storage_offset}) reaches element {last} of a storage of "
            f"{storage.size}"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    del requires_grad, backward_hooks
    return data


def _build_list(items: Any) -> list:
    return list(items)


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    del type_str
    return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        ("torch.jit._pickle", f"build_{kind}list"): _build_list
        for kind in ("int", "double", "bool", "tensor", "generic")
    },
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles data.pkl of a TorchScript archive; storages come from `read_storage`."""

    def __init__(self, data: bytes, read_storage, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}
        self._script_classes: dict[str, type] = {}
        self._dtypes = _storage_dtypes()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in self._dtypes:
            return _StorageType(name, self._dtypes[name])
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._script_classes:
                self._script_classes[qualified] = type(
                    name, (ScriptObject,), {"qualified_name": qualified}
                )
            return self._script_classes[qualified]
        raise UnsafeArchiveError(
            f"data.pkl refers to {module}.{name}, which is not a tensor, "
            f"storage or TorchScript module; it is not loaded"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
        ):
            raise UnsafeArchiveError(f"data.pkl has an unknown persistent record {pid!r:.80}")
        _, storage_type, key, _, numel = pid
        if key not in self._storages:
            raw = self._read_storage(key)
            dtype = storage_type.dtype
            if numel < 0 or len(raw) < numel * dtype.itemsize:
                raise UnsafeArchiveError(
                    f"storage data/{key} holds {len(raw)} bytes, not the "
                    f"{numel} {storage_type.name} elements it should"
                )
            array = np.frombuffer(raw, dtype, count=numel)
            if self._byteorder != sys.byteorder:
                array = array.byteswap()
            self._storages[key] = array
        return self._storages[key]


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The archive's top-level folder: the one holding data.pkl."""
    prefixes = [
        n[: -len("data.pkl")]
        for n in archive.namelist()
        if n.endswith("data.pkl") and n.count("/") == 1
    ]
    if len(prefixes) != 1:
        raise UnsafeArchiveError(
            f"{path} is not a TorchScript archive: expected one "
            f"<name>/data.pkl in it, found {len(prefixes)}"
        )
    return prefixes[0]


def _collect(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    if not isinstance(obj, ScriptObject):
        return
    if obj.state is None:
        return
    if not isinstance(obj.state, dict):
        where = prefix.rstrip(".") or "the top-level module"
        raise UnsafeArchiveError(
            f"{where} is a {obj.qualified_name} with a custom pickled state "
            f"({type(obj.state).__name__}, written by a TorchScript __getstate__); its "
            f"__setstate__ code is not run, so its tensors cannot be named"
        )
    for key, value in obj.state.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, np.ndarray):
            out[prefix + key] = value
        elif isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{key}.", out)


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{state-dict name: NumPy array} of the module in a `torch.jit.save` archive.

    Arrays keep the stored dtype (float16 stays float16; bfloat16 is `ml_dtypes.bfloat16`).
    Raises UnsafeArchiveError (a ValueError, one line) when the archive holds anything but
    tensors and plain TorchScript modules, and zipfile.BadZipFile for a damaged zip.
    """
    path = os.fspath(path)
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        names = set(archive.namelist())
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise UnsafeArchiveError(f"{path}: unknown byte order {byteorder!r:.40}")

        def read_storage(key: str) -> bytes:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise UnsafeArchiveError(f"the tensor storage {name} is missing")
            return archive.read(name)

        unpickler = _RestrictedUnpickler(archive.read(f"{prefix}data.pkl"), read_storage, byteorder)
        try:
            root = unpickler.load()
        except UnsafeArchiveError as e:
            raise UnsafeArchiveError(f"{path}: {e}") from None
        except (
            pickle.UnpicklingError,
            EOFError,
            TypeError,
            ValueError,
            AttributeError,
            IndexError,
            KeyError,
        ) as e:
            raise UnsafeArchiveError(
                f"{path}: data.pkl cannot be read ({type(e).__name__}: {str(e)[:200]})"
            ) from e
    if not isinstance(root, ScriptObject):
        raise UnsafeArchiveError(
            f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module"
        )
    tensors: dict[str, np.ndarray] = {}
    try:
        _collect(root, "", tensors)
    except UnsafeArchiveError as e:
        raise UnsafeArchiveError(f"{path}: {e}") from None
    return tensors
