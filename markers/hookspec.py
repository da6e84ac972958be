"""Hooks for vendors: implement them in a ``conftest.py`` or in an installed plugin (a ``pytest11``
entry point) to extend the suite without editing it. Example, a conftest.py next to pytest.ini::

    from runtime.device import CpuBackend

    def pytest_detr_register_devices(register):
        register("cpu-fp64acc", CpuBackend())  # --xpu cpu-fp64acc: a variant of the CPU

    def pytest_detr_adjust_error_model(model, part, precision, device):
        if device.type == "npu" and precision == "fp32":
            model.set_ulp_budget("exp", 4, "NPU math library table, release 8.0")
        if part == "transformer":
            model.scale("aten.bmm", 2.0, "split-K with 2 partial sums, VENDOR-42")

    def pytest_detr_compile(fn, spec):  # --compile mybackend: the vendor's own compile call
        return my_graph_compiler.compile(fn, **dict(spec.options))

Each adjustment of the error model is listed in the parity report next to the part it applies to.
"""
import pluggy

hookspec = pluggy.HookspecMarker("pytest")


class HookFailed(Exception):
    """A vendor's hook raised; the message names the hook, the plugin and the error."""

    def __init__(self, hook: str, plugin: str, error: Exception):
        self.hook, self.plugin, self.error = hook, plugin, error
        # A ValueError of the suite's own (a bad name or value) says what is wrong already.
        said = f": {error}" if isinstance(error, ValueError) else f" raised {type(error).__name__}: {error}"
        super().__init__(f"{hook} in {plugin}{said}")


def call_each(hook_caller, **kwargs) -> None:
    """Calls every plugin's implementation of a hook, in pluggy's order; the first that raises is a
    :class:`HookFailed` naming the plugin, where pluggy's own call would name none."""
    for impl in reversed(hook_caller.get_hookimpls()):
        try:
            impl.function(**kwargs)
        except Exception as exc:
            raise HookFailed(hook_caller.name, impl.plugin_name, exc) from exc


@hookspec
def pytest_detr_register_devices(register) -> None:
    """Registers or replaces device backends, before ``--xpu`` is resolved.

    ``register(name, backend)`` is :func:`runtime.device.register_backend`: ``backend`` is a
    :class:`runtime.device.Backend` (synchronise, memory, seed, autocast dtype, TF32 switches,
    process-group backend, versions). A ``name`` equal to the backend's device type adds that type;
    another name adds a variant that ``--xpu name`` selects. A name registered already (the suite's
    ``cpu``, ``cpu-alt``, ``cuda``, ..., or another plugin's) needs ``register(name, backend,
    replace=True)``, and the report header says what was replaced.
    """


@hookspec
def pytest_detr_adjust_error_model(model, part: str, precision: str, device) -> None:
    """Adjusts the error model of one part in one precision, before its ops are judged.

    ``model`` is a fresh :class:`parity.errormodel.ErrorModel` for the device's table: call
    ``model.set_ulp_budget(function, ulps, reason)`` with a documented accuracy table, or
    ``model.scale(op, factor, reason)`` to widen or tighten every allowance of one op. ``part`` is
    the part's name (``"transformer"``), ``precision`` one of fp32, tf32, amp, fp16, bf16, and
    ``device`` the :class:`runtime.device.Device` under test.
    """


@hookspec(firstresult=True)
def pytest_detr_compile(fn, spec):
    """Compiles one part's ``fn(module, inputs)`` for ``--compile``, or returns None to leave it to
    ``torch.compile(fn, backend=spec.backend)``.

    ``spec`` is the :class:`runtime.compiler.CompileSpec` of the command line: ``backend``, ``mode``,
    ``options`` (KEY=VALUE pairs) and ``fullgraph``. Return a callable with ``fn``'s signature. The
    suite resets dynamo before each part, counts the graphs dynamo compiled, and judges the
    compiled run's outputs and gradients against the CPU; ``compiled.*`` graph faults need the
    suite's own ``torch.compile`` call (return None).
    """
