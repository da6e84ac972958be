"""Every private API of torch that the suite uses, in one place (pytest's are in ``markers.pytest_compat``).

Vendors run lagging forks of torch, and private APIs move between releases. Each function here
tries the API and, where it is missing, falls back to what the suite can still do without it:
that fallback warns once and is recorded in :func:`fallbacks`, which the reports print, so that a
reduced check is never silent.
"""
import contextlib
import functools
import inspect
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.overrides
from torch.utils import _python_dispatch
from torch.utils import _pytree as pytree

__all__ = ["TorchDispatchMode", "TorchFunctionMode", "cuda_driver_api_version",
           "current_autograd_node", "disable_current_modes", "fallbacks", "grad_scaler",
           "has_autograd_node", "is_nondeterministic_seeded", "itemsize", "load", "named_leaves",
           "privateuse1_backend_name", "return_aliases", "tree_leaves", "tree_map",
           "untyped_storage", "written_arguments"]
_FALLBACKS: Dict[str, str] = {}


def fallbacks() -> Dict[str, str]:
    """API -> what the suite does instead, for each fallback taken in this process."""
    return dict(_FALLBACKS)


def fall_back(api: str, instead: str) -> None:
    if api not in _FALLBACKS:
        _FALLBACKS[api] = instead
        warnings.warn(f"{api} is missing in torch {torch.__version__}: {instead}", RuntimeWarning, stacklevel=3)


tree_map: Callable = pytree.tree_map
tree_leaves: Callable = getattr(pytree, "tree_leaves", None) or (lambda tree: pytree.tree_flatten(tree)[0])


def named_leaves(tree: Any, prefix: str = "output") -> List[Tuple[str, Any]]:
    """[(name, leaf)] of a pytree, named by their path (``output['pred_logits']``) where torch can
    say it, else by their position (``output[0]``)."""
    with_path = getattr(pytree, "tree_flatten_with_path", None)
    if with_path is not None:
        leaves, _ = with_path(tree)
        return [(f"{prefix}{pytree.keystr(path)}", leaf) for path, leaf in leaves]
    named = list(_paths(tree, prefix))
    flat = tree_leaves(tree)
    if len(named) == len(flat) and all(leaf is other for (_, leaf), other in zip(named, flat)):
        return named
    fall_back("torch.utils._pytree.tree_flatten_with_path", "outputs are named by position, not by key")
    return [(f"{prefix}[{i}]", leaf) for i, leaf in enumerate(tree_leaves(tree))]


def _paths(tree: Any, path: str):
    """(path, leaf) of dicts, lists, tuples and named tuples, written as ``pytree.keystr`` writes them."""
    if type(tree) is dict:
        for key, value in tree.items():
            yield from _paths(value, f"{path}[{key!r}]")
    elif isinstance(tree, tuple) and hasattr(tree, "_fields"):
        for key, value in zip(tree._fields, tree):
            yield from _paths(value, f"{path}.{key}")
    elif type(tree) in (list, tuple):
        for i, value in enumerate(tree):
            yield from _paths(value, f"{path}[{i}]")
    else:
        yield path, tree


def _stackable(torch_mode: type, get_mode: Callable, set_mode: Callable) -> type:
    """torch 1.12's mode class made to behave as in 1.13 and newer: built directly, entered with ``with``.

    1.12 builds a mode only through ``push_*_mode(constructor)``, which passes the mode below it on the
    stack as ``inner``, and its metaclass wraps every ``__init__`` to demand that argument. Here
    ``__init__`` is left unwrapped and ``__enter__`` finds ``inner``; the metaclass still wraps the
    handler, so the ops a handler runs go to ``inner``, as newer torch's popping of the mode does. With
    no mode below, ``inner`` is None rather than 1.12's pass-through mode: ops inside the handler then
    run without a detour through Python, which also turned the storage of ``set_`` into a typed one.
    """
    class Meta(type(torch_mode)):
        def __new__(metacls, name, bases, dct):
            init = dct.pop("__init__", None)
            cls = super().__new__(metacls, name, bases, dct)
            if init is not None:
                cls.__init__ = init
            return cls

    class Mode(torch_mode, metaclass=Meta):
        def __init__(self):
            self.inner = None

        def __enter__(self):
            outer = get_mode()
            self.__dict__.setdefault("_outer", []).append(outer)
            self.inner = outer
            set_mode(self)
            return self

        def __exit__(self, *exc_info):
            set_mode(self._outer.pop())

    Mode.__name__ = Mode.__qualname__ = torch_mode.__name__
    return Mode


if hasattr(_python_dispatch.TorchDispatchMode, "__enter__"):
    TorchDispatchMode = _python_dispatch.TorchDispatchMode
    TorchFunctionMode = torch.overrides.TorchFunctionMode
else:
    TorchDispatchMode = _stackable(_python_dispatch.TorchDispatchMode, torch._C._get_torch_dispatch_mode,
                                   torch._C._set_torch_dispatch_mode)
    TorchFunctionMode = _stackable(torch.overrides.TorchFunctionMode, torch._C._get_torch_function_mode,
                                   torch._C._set_torch_function_mode)


@contextlib.contextmanager
def _no_dispatch_mode():
    """torch 1.12 has one current dispatch mode, which holds the rest of the stack as ``inner``."""
    outer = torch._C._get_torch_dispatch_mode()
    torch._C._set_torch_dispatch_mode(None)
    try:
        yield
    finally:
        torch._C._set_torch_dispatch_mode(outer)


@contextlib.contextmanager
def _popped_modes():
    """torch 1.13 keeps a stack of dispatch modes; this pops all of them and pushes them back."""
    popped = []
    while _python_dispatch._get_current_dispatch_mode() is not None:
        popped.append(_python_dispatch._pop_mode())
    try:
        yield
    finally:
        for mode in reversed(popped):
            _python_dispatch._push_mode(mode)


def written_arguments(func: Any) -> List[str]:
    """The names of the arguments an aten overload writes (``Tensor(a!) self``, ``out``)."""
    return [name for name, write in _aliases(func)[0] if write]


def return_aliases(func: Any) -> List[Optional[bool]]:
    """For each return of an aten overload: None when it is new memory, else whether it is written
    (False for a view of an input, ``Tensor(a)``; True for ``Tensor(a!)``)."""
    return list(_aliases(func)[1])


@functools.lru_cache(maxsize=None)
def _aliases(func: Any) -> Tuple[Tuple[Tuple[str, Optional[bool]], ...], Tuple[Optional[bool], ...]]:
    schema = func._schema
    try:
        return (tuple((a.name, _is_write(a.alias_info)) for a in schema.arguments),
                tuple(_is_write(r.alias_info) for r in schema.returns))
    except AttributeError:  # torch 1.12: no alias_info, read the schema's text
        return parse_aliases(str(schema))


def _is_write(alias_info: Any) -> Optional[bool]:
    return None if alias_info is None else bool(alias_info.is_write)


_GROUP = re.compile(r"(\w*)[\[\]?]*\(([^()]*)\)")
_TYPE_CONSTRUCTORS = ("Dict", "Future", "Tuple", "Union", "Optional", "RRef", "Await", "List")


def parse_aliases(schema: str) -> Tuple[Tuple[Tuple[str, Optional[bool]], ...], Tuple[Optional[bool], ...]]:
    """(((argument name, written), ...), (written, ...) per return) from a schema's text such as
    ``aten::add_.Tensor(Tensor(a!) self, Tensor other, *, Scalar alpha=1) -> Tensor(a!)``; written is
    None for an argument or return without an alias annotation. ``*`` (keyword-only from here) and
    ``...`` (variadic) are markers, not arguments."""
    start = schema.index("(")
    depth = 0
    for end in range(start, len(schema)):
        depth += {"(": 1, ")": -1}.get(schema[end], 0)
        if depth == 0:
            break
    returns = schema[end + 1:].split("->", 1)[1].strip()
    if returns.startswith("("):
        returns = returns[1:-1]
    arguments = [(part.split("=")[0].split()[-1], _annotated_write(part))
                 for part in _split_top(schema[start + 1:end]) if part not in ("*", "...")]
    return tuple(arguments), tuple(_annotated_write(part) for part in _split_top(returns) if part != "...")


def _annotated_write(declaration: str) -> Optional[bool]:
    """The alias annotation of ``Tensor(a!) self`` or ``t[](a)``, not the arguments of ``Dict(str, t)``."""
    for match in _GROUP.finditer(declaration.split("=")[0]):
        if match.group(1) not in _TYPE_CONSTRUCTORS:
            return "!" in match.group(2)
    return None


def _split_top(text: str) -> List[str]:
    """``text`` split at its commas outside brackets, each part stripped."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [p for p in parts if p]


SEEDED_OPS = frozenset((
    "alpha_dropout", "bernoulli", "bernoulli_", "cauchy", "cauchy_", "dropout", "exponential", "exponential_",
    "_fused_dropout", "geometric", "geometric_", "log_normal", "log_normal_", "multinomial", "native_dropout",
    "normal", "normal_", "poisson", "rand", "rand_like", "randint", "randint_like", "randn", "randn_like",
    "randperm", "rrelu_with_noise", "rrelu_with_noise_", "_standard_gamma", "uniform", "uniform_"))


def is_nondeterministic_seeded(func: Any) -> bool:
    """Whether an aten overload's result depends on the RNG: its ``nondeterministic_seeded`` tag
    (torch 1.13 and newer) or its name in :data:`SEEDED_OPS`, aten's seeded ops, which torch 1.13 does
    not all tag (randint, cauchy, log_normal...) and torch 1.12 has no tags for."""
    tag = getattr(getattr(torch, "Tag", None), "nondeterministic_seeded", None)
    if tag is not None:
        return tag in func.tags or str(func.overloadpacket).split(".", 1)[1] in SEEDED_OPS
    fall_back("torch.Tag", "random ops are known by name (dropout, bernoulli, rand*, normal, uniform, ...)")
    return str(func.overloadpacket).split(".", 1)[1] in SEEDED_OPS


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (``dtype.itemsize`` is torch 2.1 and newer)."""
    size = getattr(dtype, "itemsize", None)
    return size if size is not None else torch.empty((), dtype=dtype).element_size()


def untyped_storage(t: torch.Tensor) -> Any:
    """The bytes under ``t``: ``untyped_storage()`` (torch 2.0 and newer), else the typed storage's
    untyped one (``Tensor._storage()`` would answer a typed storage under a torch function mode)."""
    get = getattr(t, "untyped_storage", None)
    if get is not None:
        return get()
    typed = t.storage()
    return typed.untyped() if hasattr(typed, "untyped") else typed._untyped()


def load(path: Any, weights_only: bool, **kwargs) -> Any:
    """``torch.load``; ``weights_only`` (torch 1.13 and newer) refuses pickled code where asked for."""
    if "weights_only" in inspect.signature(torch.load).parameters:
        return torch.load(path, weights_only=weights_only, **kwargs)
    if weights_only:
        fall_back("torch.load(weights_only=True)", "the file is unpickled in full: load only files you trust")
    return torch.load(path, **kwargs)


def has_autograd_node() -> bool:
    """Whether :func:`current_autograd_node` can tell a backward op from a forward one (torch 2.0+)."""
    return hasattr(torch._C, "_current_autograd_node")


def current_autograd_node() -> Optional[Any]:
    """The autograd node running now during backward, or None (then ops in backward are attributed
    to their phase only, not to a module)."""
    get = getattr(torch._C, "_current_autograd_node", None)
    if get is None:
        fall_back("torch._C._current_autograd_node", "backward ops are not attributed to modules, and ops "
                   "outside every module have the phase 'forward or backward'")
        return None
    return get()


def disable_current_modes():
    """A context that suspends the active dispatch modes (the capture) for the suite's own work."""
    disable = getattr(_python_dispatch, "_disable_current_modes", None)
    if disable is None and hasattr(_python_dispatch, "_pop_mode"):
        return _popped_modes()
    if disable is None and hasattr(torch._C, "_get_torch_dispatch_mode"):
        return _no_dispatch_mode()
    if disable is None:
        fall_back("torch.utils._python_dispatch._disable_current_modes",
                   "the suite's own work inside a capture is not suspended")
        return contextlib.nullcontext()
    return disable()


def cuda_driver_api_version() -> int:
    """The CUDA driver API version (12020 for 12.2), or 0 when unknown."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is None:
        fall_back("torch._C._cuda_getDriverVersion", "the CUDA driver version is read from /proc only")
        return 0
    try:
        return int(get())
    except Exception:  # no driver loaded: not a fallback of the API, just no answer
        return 0


def privateuse1_backend_name() -> str:
    """The name an out-of-tree extension gave the privateuse1 device, ``privateuseone`` when none."""
    get = getattr(torch._C, "_get_privateuse1_backend_name", None)
    if get is None:
        fall_back("torch._C._get_privateuse1_backend_name", "no privateuse1 device can be used")
        return "privateuseone"
    return get()


def grad_scaler(device_type: str) -> Any:
    """A loss scaler for fp16 on ``device_type``: ``torch.amp.GradScaler`` where it exists (torch 2.3
    and newer), else the CUDA one that older torch has."""
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device_type)
    fall_back("torch.amp.GradScaler", "fp16 loss scaling uses torch.cuda.amp.GradScaler")
    return torch.cuda.amp.GradScaler()
