"""Every private API of torch, pytest and pytest-benchmark that the suite uses, in one place.

Vendors run lagging forks of torch, and private APIs move between releases. Each function here
tries the API and, where it is missing, falls back to what the suite can still do without it:
that fallback warns once and is recorded in :func:`fallbacks`, which the reports print, so that a
reduced check is never silent.
"""
import contextlib
import copy
import inspect
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["TorchDispatchMode", "benchmark_stats", "cuda_driver_api_version", "current_autograd_node",
           "disable_current_modes", "fallbacks", "flop_counter", "grad_scaler", "named_leaves", "privateuse1_backend_name", "reroot",
           "session_of", "tree_leaves", "tree_map"]
_FALLBACKS: Dict[str, str] = {}


def fallbacks() -> Dict[str, str]:
    """API -> what the suite does instead, for each fallback taken in this process."""
    return dict(_FALLBACKS)


def _fall_back(api: str, instead: str) -> None:
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
    _fall_back("torch.utils._pytree.tree_flatten_with_path", "outputs are named by position, not by key")
    return [(f"{prefix}[{i}]", leaf) for i, leaf in enumerate(tree_leaves(tree))]


def current_autograd_node() -> Optional[Any]:
    """The autograd node running now during backward, or None (then ops in backward are attributed
    to their phase only, not to a module)."""
    get = getattr(torch._C, "_current_autograd_node", None)
    if get is None:
        _fall_back("torch._C._current_autograd_node", "backward ops are not attributed to modules")
        return None
    return get()


def disable_current_modes():
    """A context that suspends the active dispatch modes (the capture) for the suite's own work."""
    disable = getattr(getattr(torch.utils, "_python_dispatch", None), "_disable_current_modes", None)
    if disable is None:
        _fall_back("torch.utils._python_dispatch._disable_current_modes",
                   "the suite's own work inside a capture is not suspended")
        return contextlib.nullcontext()
    return disable()


def cuda_driver_api_version() -> int:
    """The CUDA driver API version (12020 for 12.2), or 0 when unknown."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is None:
        _fall_back("torch._C._cuda_getDriverVersion", "the CUDA driver version is read from /proc only")
        return 0
    try:
        return int(get())
    except Exception:  # no driver loaded: not a fallback of the API, just no answer
        return 0


def privateuse1_backend_name() -> str:
    """The name an out-of-tree extension gave the privateuse1 device, ``privateuseone`` when none."""
    get = getattr(torch._C, "_get_privateuse1_backend_name", None)
    if get is None:
        _fall_back("torch._C._get_privateuse1_backend_name", "no privateuse1 device can be used")
        return "privateuseone"
    return get()


def grad_scaler(device_type: str) -> Any:
    """A loss scaler for fp16 on ``device_type``: ``torch.amp.GradScaler`` where it exists (torch 2.3
    and newer), else the CUDA one that older torch has."""
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device_type)
    _fall_back("torch.amp.GradScaler", "fp16 loss scaling uses torch.cuda.amp.GradScaler")
    return torch.cuda.amp.GradScaler()


def flop_counter() -> Any:
    """A context that counts FLOPs, with ``get_total_flops()``: ``FlopCounterMode`` (torch 2.1 and
    newer), else the suite's own counter of matmuls and convolutions (:mod:`detr.flops`)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        from .flops import FlopCounter

        _fall_back("torch.utils.flop_counter", "FLOPs are counted by detr.flops (matmuls and convolutions)")
        return FlopCounter()
    return FlopCounterMode(display=False)


def benchmark_stats(benchmark) -> Any:
    """pytest-benchmark's statistics of a finished benchmark (min, max, mean, median, ... seconds)."""
    stats = getattr(benchmark, "stats", None)
    return getattr(stats, "stats", stats)


def session_of(terminalreporter) -> Any:
    """The session of pytest's terminal reporter (public as ``_session`` only)."""
    return getattr(terminalreporter, "_session", None)


def reroot(config, args: List[str]) -> bool:
    """Settles pytest's rootdir and ini file again once the suite's options are known.

    pytest chooses its rootdir and ini file from the arguments before any installed plugin adds its
    options, so the value of ``--report-dir /tmp/out`` is taken for a test path, and an existing
    folder there becomes the rootdir: pytest.ini, its markers and its options are then lost. Called
    before the initial conftests load, with the options known, this redoes that choice with the
    real test paths, applies the ini file's addopts to ``args`` in place, and returns whether
    anything changed.
    """
    from _pytest.config import findpaths

    namespace = config._parser.parse_known_args(args)
    if namespace.inifilename or namespace.rootdir:
        return False
    wanted = {"inifile": None, "override_ini": namespace.override_ini, "args": namespace.file_or_dir,
              "rootdir_cmd_arg": None, "invocation_dir": config.invocation_params.dir,
              "config": config}
    accepted = inspect.signature(findpaths.determine_setup).parameters
    rootpath, inipath, inicfg, *ignored = findpaths.determine_setup(**{k: v for k, v in wanted.items() if k in accepted})
    if (rootpath, inipath) == (config.rootpath, config.inipath):
        return False
    config._rootpath, config._inipath, config._inicfg = rootpath, inipath, inicfg
    if ignored and hasattr(config, "_ignored_config_files"):
        config._ignored_config_files = ignored[0]
    config._inicache.clear()
    config._parser.extra_info.update(rootdir=str(rootpath), inifile=str(inipath))
    args[:] = list(config.getini("addopts")) + args
    namespace = config._parser.parse_known_args(args, namespace=copy.copy(config.option))
    namespace.confcutdir = str(inipath.parent if inipath is not None else rootpath)
    config.known_args_namespace = namespace
    return True
