"""The compatibility module: where a private API is missing the suite falls back, warns once, and
records it for the reports."""
import collections
import pickle
import warnings

import pytest
import torch

from parity.capture import capture
from runtime import compat, flops
from runtime.flops import FlopCounter


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(compat, "_FALLBACKS", {})


Pair = collections.namedtuple("Pair", "first second")


def test_named_leaves_by_path_with_or_without_torchs_paths(fresh, monkeypatch):
    tree = {"pred_logits": torch.zeros(1), "aux": [torch.ones(1), (2, Pair(torch.ones(2), 3))]}
    names = ["output['pred_logits']", "output['aux'][0]", "output['aux'][1][0]", "output['aux'][1][1].first",
             "output['aux'][1][1].second"]
    assert [n for n, _ in compat.named_leaves(tree)] == names
    if hasattr(compat.pytree, "tree_flatten_with_path"):
        monkeypatch.delattr(compat.pytree, "tree_flatten_with_path")
    named = compat.named_leaves(tree)
    assert [n for n, _ in named] == names and [leaf for _, leaf in named] == compat.tree_leaves(tree)
    assert compat.fallbacks() == {}


def test_named_leaves_by_position_where_the_tree_has_nodes_of_its_own(fresh, monkeypatch):
    if hasattr(compat.pytree, "tree_flatten_with_path"):
        monkeypatch.delattr(compat.pytree, "tree_flatten_with_path")

    class Box(list):
        pass

    monkeypatch.setattr(compat, "tree_leaves", lambda tree: [tree["a"][0], tree["b"]])
    tree = {"a": Box([torch.zeros(1)]), "b": torch.ones(1)}  # a node _paths does not know, as a leaf
    with pytest.warns(RuntimeWarning, match="tree_flatten_with_path is missing"):
        assert [n for n, _ in compat.named_leaves(tree)] == ["output[0]", "output[1]"]
    assert "outputs are named by position" in compat.fallbacks()["torch.utils._pytree.tree_flatten_with_path"]


def test_missing_autograd_node_falls_back_once(fresh, monkeypatch):
    monkeypatch.delattr(torch._C, "_current_autograd_node", raising=False)
    with pytest.warns(RuntimeWarning):
        assert compat.current_autograd_node() is None
    assert compat.current_autograd_node() is None  # warned once, recorded once
    assert list(compat.fallbacks()) == ["torch._C._current_autograd_node"]


def test_present_apis_take_no_fallback(fresh):
    """Each API this torch has is used as it is; on torch 1.12 the two it lacks are the only fallbacks."""
    with compat.disable_current_modes():
        pass
    expected = set()
    if hasattr(torch._C, "_current_autograd_node"):
        assert compat.current_autograd_node() is None  # not in backward
    else:
        expected.add("torch._C._current_autograd_node")
    if hasattr(torch._C, "_get_privateuse1_backend_name"):
        assert compat.privateuse1_backend_name() == torch._C._get_privateuse1_backend_name()
    else:
        expected.add("torch._C._get_privateuse1_backend_name")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compat.current_autograd_node(), compat.privateuse1_backend_name()
    assert set(compat.fallbacks()) == expected


def test_cuda_driver_version_is_a_number_with_or_without_the_api(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        version = compat.cuda_driver_api_version()
    assert isinstance(version, int) and version >= 0
    assert (version > 0) or not torch.cuda.is_available() or compat.fallbacks()


class Recorder(compat.TorchDispatchMode):
    def __init__(self, seen, name):
        super().__init__()
        self.seen, self.name = seen, name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((self.name, str(func.overloadpacket)))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_are_built_directly_and_stack():
    """torch 1.12 builds modes only through push_torch_dispatch_mode; compat's base class behaves as
    newer torch's: the inner mode sees an op first and the op it runs goes on to the outer one."""
    seen, x = [], torch.ones(2)
    with Recorder(seen, "outer"):
        with Recorder(seen, "inner") as inner:
            x.add(1)
            with compat.disable_current_modes():
                x.mul(2)
        x.sub(1)
    x.div(2)
    assert isinstance(inner, Recorder)
    assert seen == [("inner", "aten.add"), ("outer", "aten.add"), ("outer", "aten.sub")]


def test_a_mode_can_be_entered_again():
    seen, x = [], torch.ones(1)
    mode = Recorder(seen, "mode")
    for _ in range(2):
        with mode:
            x.neg()
    x.neg()
    assert seen == [("mode", "aten.neg")] * 2


class Counter(compat.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_function_modes_are_built_directly():
    with Counter() as counter:
        torch.ones(2).exp()
    torch.ones(2).exp()
    assert counter.calls >= 1
    calls = counter.calls
    torch.ones(2).exp()
    assert counter.calls == calls


SCHEMAS = [
    ("aten::add_.Tensor(Tensor(a!) self, Tensor other, *, Scalar alpha=1) -> Tensor(a!)",
     (("self", True), ("other", None), ("alpha", None)), (True,)),
    ("aten::split.Tensor(Tensor(a -> *) self, SymInt split_size, int dim=0) -> Tensor(a)[]",
     (("self", False), ("split_size", None), ("dim", None)), (False,)),
    ("aten::max.dim_max(Tensor self, int dim, bool keepdim=False, *, Tensor(a!) max, Tensor(b!) max_values)"
     " -> (Tensor(a!) values, Tensor(b!) indices)",
     (("self", None), ("dim", None), ("keepdim", None), ("max", True), ("max_values", True)), (True, True)),
    ("aten::conv2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=[1, 1], int[2] padding=[0, 0])"
     " -> Tensor", (("input", None), ("weight", None), ("bias", None), ("stride", None), ("padding", None)),
     (None,)),
    ("aten::_foreach_add_.List(Tensor(a!)[] self, Tensor[] other, *, Scalar alpha=1) -> ()",
     (("self", True), ("other", None), ("alpha", None)), ()),
    ("aten::add_.t(t[](a!) self, t[] b) -> t[]", (("self", True), ("b", None)), (None,)),
    ("aten::set_.source_Storage(Tensor(a!) self, Storage source) -> Tensor(a!)",
     (("self", True), ("source", None)), (True,)),
    # '...' marks variadic arguments or returns, not an argument (an overload torch.compile registers)
    ("aten::einsum.sublist(Tensor a, ...) -> Tensor", (("a", None),), (None,)),
    ("prim::TupleUnpack(Any tup) -> ...", (("tup", None),), ()),
]


@pytest.mark.parametrize("schema,arguments,returns", SCHEMAS)
def test_aliasing_read_from_a_schemas_text(schema, arguments, returns):
    assert compat.parse_aliases(schema) == (arguments, returns)


def aten_overloads():
    for name in dir(torch.ops.aten):
        packet = getattr(torch.ops.aten, name, None)
        for overload in getattr(packet, "overloads", lambda: [])():
            yield getattr(packet, overload)


def test_aliasing_from_the_text_agrees_with_alias_info_on_every_aten_op():
    """Where torch has alias_info (1.13 and newer) the parser that torch 1.12 needs must agree with it."""
    if not hasattr(torch.ops.aten.add_.Tensor._schema.arguments[0], "alias_info"):
        pytest.skip(f"torch {torch.__version__} has no alias_info to compare with")
    checked = 0
    for func in aten_overloads():
        arguments, returns = compat._aliases(func)
        assert compat.parse_aliases(str(func._schema)) == (arguments, returns), str(func._schema)
        checked += 1
    assert checked > 1000


def test_written_arguments_and_views():
    assert compat.written_arguments(torch.ops.aten.add_.Tensor) == ["self"]
    assert compat.written_arguments(torch.ops.aten.add.out) == ["out"]
    assert compat.return_aliases(torch.ops.aten.t.default) == [False]
    assert compat.return_aliases(torch.ops.aten.add.Tensor) == [None]


@pytest.mark.parametrize("dtype,size", [(torch.bool, 1), (torch.uint8, 1), (torch.bfloat16, 2), (torch.float64, 8)])
def test_itemsize(dtype, size):
    assert compat.itemsize(dtype) == size


def test_untyped_storage_is_the_bytes_under_a_view_also_under_a_function_mode():
    base = torch.arange(12.0).reshape(3, 4)
    view = base.t()[1:]
    assert compat.untyped_storage(view).nbytes() == 12 * 4
    assert compat.untyped_storage(view).data_ptr() == base.data_ptr()
    with Counter():  # torch 1.12's Tensor._storage() answered a typed storage here
        raw = torch.empty(0, dtype=torch.uint8).set_(compat.untyped_storage(view))
    assert raw.numel() == 48


def test_random_ops_known_by_tag_or_by_name(fresh, monkeypatch):
    aten = torch.ops.aten
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert compat.is_nondeterministic_seeded(aten.native_dropout.default)
        assert not compat.is_nondeterministic_seeded(aten.add.Tensor)
    compat._FALLBACKS.clear()
    if hasattr(torch, "Tag"):
        tagged = {str(f.overloadpacket).split(".", 1)[1] for f in aten_overloads()
                  if torch.Tag.nondeterministic_seeded in f.tags}
        if {"randint", "cauchy", "normal", "multinomial", "poisson"} <= tagged:  # 1.13 and 2.0 tag only some
            assert compat.SEEDED_OPS <= tagged | {op for op in compat.SEEDED_OPS if not hasattr(aten, op)}
        assert compat.is_nondeterministic_seeded(aten.randint.low) and compat.fallbacks() == {}
        monkeypatch.delattr(torch, "Tag")
    with pytest.warns(RuntimeWarning, match="torch.Tag is missing"):
        assert compat.is_nondeterministic_seeded(aten.bernoulli_.float)
    assert not compat.is_nondeterministic_seeded(aten.mm.default)
    assert "known by name" in compat.fallbacks()["torch.Tag"]


def test_load_with_or_without_weights_only(fresh, monkeypatch, tmp_path):
    path = tmp_path / "state.pth"
    torch.save({"w": torch.ones(2), "f": compat_kwargs}, path)  # a function: pickled code
    if "weights_only" in compat.inspect.signature(torch.load).parameters:
        with pytest.raises(pickle.UnpicklingError):
            compat.load(path, weights_only=True)
        assert compat.fallbacks() == {}
    old_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, map_location=None: old_load(f, map_location=map_location,
                                                                             **compat_kwargs(old_load)))
    with pytest.warns(RuntimeWarning, match="weights_only"):
        assert compat.load(path, weights_only=True)["f"] is compat_kwargs
    assert "unpickled in full" in compat.fallbacks()["torch.load(weights_only=True)"]


def compat_kwargs(load):
    return {"weights_only": False} if "weights_only" in compat.inspect.signature(load).parameters else {}


def test_profiler_handles_are_not_recorded():
    """Optimizers wrap their step in record_function; torch 1.12's enter op returns a tensor handle."""
    x = torch.ones(3)
    step = torch.autograd.profiler.record_function("step")  # 1.12 makes an empty handle here

    def fn():
        with step:
            return x + 1

    _, trace = capture(fn, keep="outputs")
    assert [r.op for r in trace] == ["aten.add"]


def test_own_flop_counter_on_any_torch():
    """runtime.flops, the benchmark's counter where torch.utils.flop_counter is missing, by hand."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with FlopCounter() as counter:
        torch.randn(5, 6) @ torch.randn(6, 7)
        torch.nn.functional.conv2d(x, w, padding=1).sum().backward()
    assert counter.counts["aten.mm"] == 2 * 5 * 6 * 7
    conv = 2 * 2 * 8 * 8 * 4 * 3 * 9
    assert counter.counts["aten.convolution"] == conv
    assert counter.counts["aten.convolution_backward"] == 2 * conv
    assert counter.get_total_flops() == 2 * 5 * 6 * 7 + 3 * conv


def test_flop_counter_is_torchs_where_it_has_one(fresh):
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        with pytest.warns(RuntimeWarning, match="flop_counter is missing"):
            assert isinstance(flops.flop_counter(), FlopCounter)
    else:
        assert isinstance(flops.flop_counter(), FlopCounterMode) and compat.fallbacks() == {}
