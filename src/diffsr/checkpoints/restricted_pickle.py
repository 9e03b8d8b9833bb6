"""A pickle module for `torch.load(pickle_module=...)` that never runs code from the file.

Lightning checkpoints (.ckpt) pickle hyper-parameters and callbacks (OmegaConf configs, ModelCheckpoint, ...)
beside the tensors, so torch's weights_only loader refuses them. This unpickler rebuilds tensors, storages,
containers and plain values, and gives every other class or function the file names an inert placeholder
(`NotUnpickled`): nothing is imported, and nothing the file names is called except torch's own tensor-rebuild
functions and the few constructors in `_allowed`. Every global of a pickle goes through `find_class`, so this is
the whole guard. Written by hand: torch and pickle offer only refusal, not placeholders.
"""

from __future__ import annotations

import functools
import pickle
from collections import OrderedDict

import torch

# torch._utils functions that turn a storage (or its metadata) into a tensor or Parameter (torch's
# weights_only loader admits the same ones).
_TENSOR_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                      "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                      "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
                      "_rebuild_device_tensor_from_cpu_tensor")


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How pickle protocol 2 writes bytes (`_codecs.encode(text, 'latin1')`); no other codec is looked up."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not how pickle writes bytes")
    return text.encode("latin1")


@functools.cache
def _allowed() -> dict[str, object]:
    """What `find_class` returns for real, by the name the pickle gives (module.name)."""
    allowed: dict[str, object] = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "_codecs.encode": _latin1_bytes,
        "torch.Size": torch.Size,
        "torch.Tensor": torch.Tensor,
        "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "torch.storage.UntypedStorage": torch.UntypedStorage,
        "torch.UntypedStorage": torch.UntypedStorage,
    }
    allowed.update({f"torch._utils.{name}": getattr(torch._utils, name)
                    for name in _TENSOR_REBUILDERS if hasattr(torch._utils, name)})
    # dtypes, layouts, memory formats and quantisation schemes pickle by name, e.g. torch.float16
    constants = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
    allowed.update({str(value): value for value in vars(torch).values() if isinstance(value, constants)})
    return allowed


class NotUnpickled:
    """Stands for an object of a class diffsr does not unpickle (or a function it does not call). It keeps what
    the file gave it as data: constructor arguments, state, dict items, list items; it does nothing else."""

    qualified_name = "?"  # module.name of the class the file names

    def __new__(cls, *args, **kwargs):
        placeholder = super().__new__(cls)
        placeholder.args, placeholder.state, placeholder.dict_items, placeholder.list_items = args, None, {}, []
        return placeholder

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def __setitem__(self, key, value) -> None:  # a dict subclass's items
        self.dict_items[key] = value

    def extend(self, items) -> None:  # a list subclass's items
        self.list_items.extend(items)

    def __repr__(self) -> str:
        return f"<{self.qualified_name}, not unpickled>"


class Unpickler(pickle.Unpickler):
    """torch.load wraps this class (adding storage loading); every global the pickle names comes through here."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol 2 (torch.save's) writes Python 2's name for builtins
            module = "builtins"
        qualified = f"{module}.{name}"
        allowed = _allowed().get(qualified)
        if allowed is not None:
            return allowed
        if qualified not in self.placeholders:
            self.placeholders[qualified] = type("NotUnpickled", (NotUnpickled,), {"qualified_name": qualified})
        return self.placeholders[qualified]
