"""The private APIs of pytest and pytest-benchmark that the plugin uses, in one place (those of torch
are in :mod:`runtime.compat`)."""
import copy
import inspect
from typing import Any, List


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
    rootpath, inipath, inicfg, *ignored = findpaths.determine_setup(
        **{k: v for k, v in wanted.items() if k in accepted}
    )
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


def benchmark_session(config) -> Any:
    """pytest-benchmark's session (``config._benchmarksession``), or None without the plugin."""
    return getattr(config, "_benchmarksession", None)
