"""The model manager with fake device accounting: eviction order, re-use, look-ahead, stale files, offloading,
streaming, out-of-memory recovery; and the real accounting with faked torch.cuda calls."""

from __future__ import annotations

import pytest

from engine import Executor, Input, NodeRegistry, Output, Result, node, validate
from runtime.memory import GiB, MiB, TorchMemory, is_out_of_memory, parse_bytes
from runtime.models import ModelHandle, ModelManager, OutOfMemory, handles_in

MODEL = 60 * MiB  # every fake model; budgets below fit one (100 MB) or two (150 MB), never more


class Weights:
    """A stand-in for a module: no tensors, so the manager counts its handle's declared size."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Weights({self.name})"


class FakeMemory:
    """Keeps accounts only: free bytes per device are whatever the test says; moves are recorded."""

    def __init__(self, **free: int):
        self.free_bytes = {"cpu": 64 * GiB, "cuda:0": 64 * GiB, **{k.replace("_", ":"): v for k, v in free.items()}}
        self.moves: list[tuple[object, str, bool]] = []
        self.released: list[str] = []
        self.settled: list[str] = []

    def free(self, device: str) -> int:
        return self.free_bytes[device]

    def move(self, module, device: str, *, recurse: bool = True) -> None:
        self.moves.append((module, device, recurse))

    def release(self, device: str) -> None:
        self.released.append(device)

    def settle(self, device: str) -> None:
        self.settled.append(device)


class Loads:
    """Handles whose loader counts how often each model is read."""

    def __init__(self):
        self.count: dict[str, int] = {}

    def handle(self, name: str, *, version: tuple = (1,), device: str = "cpu", nbytes: int = MODEL,
               streamable: bool = False, build=None) -> ModelHandle:
        def load(torch_device: str):
            self.count[name] = self.count.get(name, 0) + 1
            return build() if build else Weights(name)
        return ModelHandle(origin=name, version=version, weight_bytes=nbytes, device=device, load=load, label=name,
                           streamable=streamable)


def manager(**budgets) -> ModelManager:
    return ModelManager(FakeMemory(), budgets={k.replace("_", ":"): v for k, v in budgets.items()},
                        reserves={"cpu": 0, "cuda": 0})


def loaded_names(models: ModelManager) -> list[str]:
    return [m.name for m in models.loaded()]


def use(models: ModelManager, handle: ModelHandle, working: int = 0):
    with models.use(handle, working=working) as module:
        return module


def test_models_load_lazily_once_and_are_reused():
    loads, models = Loads(), manager(cpu=150 * MiB)
    a = loads.handle("a")
    assert loads.count == {} and models.loaded() == []
    first, second = use(models, a), use(models, a)
    assert first is second and loads.count == {"a": 1}
    assert models.held("cpu") == MODEL and models.where(a) == "cpu"


def test_least_recently_used_goes_first_when_the_budget_holds_one():
    loads, models = Loads(), manager(cpu=100 * MiB)
    a, b = loads.handle("a"), loads.handle("b")
    use(models, a)
    use(models, b)
    assert loaded_names(models) == ["b"]  # a was dropped to make room
    use(models, a)
    assert loaded_names(models) == ["a"] and loads.count == {"a": 2, "b": 1}
    assert models.stats["drops"] == 2


def test_eviction_order_is_least_recently_used_first():
    loads, models = Loads(), manager(cpu=150 * MiB)
    a, b, c = (loads.handle(n) for n in "abc")
    use(models, a)
    use(models, b)
    use(models, a)  # b is now the least recently used
    use(models, c)
    assert sorted(loaded_names(models)) == ["a", "c"]


def test_working_memory_is_made_room_for_and_given_back_after_big_calls():
    loads, models = Loads(), manager(cpu=150 * MiB)
    a, b = loads.handle("a"), loads.handle("b")
    use(models, a)
    use(models, b, working=20 * MiB)  # 60 + 60 + 20 <= 150: both stay
    assert sorted(loaded_names(models)) == ["a", "b"] and models.memory.settled == []
    use(models, b, working=80 * MiB)  # 60 + 60 + 80 > 150: a goes
    assert loaded_names(models) == ["b"] and models.memory.settled == ["cpu"]


def test_a_model_in_use_is_never_evicted():
    loads, models = Loads(), manager(cpu=100 * MiB)
    a, b = loads.handle("a"), loads.handle("b")
    with models.use(a):
        with models.use(b):  # over budget: loaded anyway, with a warning, and a is kept
            assert sorted(loaded_names(models)) == ["a", "b"]
    assert models.stats["over_budget"] == 1


def test_lookahead_keeps_what_later_nodes_need():
    loads, models = Loads(), manager(cpu=150 * MiB)
    a, b, c = (loads.handle(n) for n in "abc")
    use(models, a)
    use(models, c)  # a is least recently used, but a later node needs it
    with models.lookahead({a}):
        use(models, b)
    assert sorted(loaded_names(models)) == ["a", "b"]
    assert loads.count == {"a": 1, "b": 1, "c": 1}


def test_lookahead_evicts_needed_models_only_as_a_last_resort():
    loads, models = Loads(), manager(cpu=100 * MiB)
    a, b = loads.handle("a"), loads.handle("b")
    use(models, a)
    with models.lookahead({a}):
        use(models, b)
    assert loaded_names(models) == ["b"]


def test_a_replaced_file_is_read_again_and_the_stale_weights_dropped():
    loads, models = Loads(), manager(cpu=1 * GiB)
    old = use(models, loads.handle("ckpt#unet", version=(100, 1)))
    new = use(models, loads.handle("ckpt#unet", version=(100, 2)))  # same name and size, newer mtime
    assert new is not old and loads.count == {"ckpt#unet": 2}
    assert len(models.loaded()) == 1 and models.held("cpu") == MODEL
    assert models.stats["stale"] == 1


def test_other_variants_of_one_file_coexist():
    models = manager(cpu=1 * GiB)
    fp32 = ModelHandle("ckpt#unet", (1,), ("float32",), MODEL, load=lambda d: Weights("fp32"))
    bf16 = ModelHandle("ckpt#unet", (1,), ("bfloat16",), MODEL, load=lambda d: Weights("bf16"))
    use(models, fp32)
    use(models, bf16)
    assert len(models.loaded()) == 2


def test_gpu_models_are_offloaded_to_cpu_when_it_has_room_else_dropped():
    loads, models = Loads(), manager(cuda=100 * MiB, cpu=100 * MiB)
    a, b, c = (loads.handle(n, device="cuda:0") for n in "abc")
    use(models, a)
    use(models, b)
    assert models.where(a) == "cpu" and models.where(b) == "cuda:0"  # offloaded, not dropped
    use(models, c)
    assert models.where(b) == "cpu" and models.where(a) is None  # the CPU made room for b by dropping a
    use(models, b)  # back from the CPU: moved, not read again
    assert loads.count == {"a": 1, "b": 1, "c": 1} and models.stats["moves"] >= 1


def test_device_free_memory_limits_room_below_the_budget():
    loads = Loads()
    memory = FakeMemory(cuda_0=90 * MiB)
    models = ModelManager(memory, budgets={"cuda": 1 * GiB}, reserves={"cuda": 20 * MiB, "cpu": 0})
    assert models.room("cuda") == 70 * MiB
    a = loads.handle("a", device="cuda", nbytes=50 * MiB)
    use(models, a)
    assert models.where(a) == "cuda:0"


def test_a_model_too_big_for_the_gpu_streams_its_blocks():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    def build():
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                   torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)))

    reference = build()
    block = 64 * 65 * 4  # one Linear(64, 64)
    loads, models = Loads(), manager(cuda=int(2.5 * block), cpu=1 * GiB)
    handle = loads.handle("big", device="cuda:0", nbytes=sum(p.numel() * 4 for p in reference.parameters()),
                          streamable=True, build=lambda: reference)
    memory = models.memory
    x = torch.randn(3, 64)
    with models.use(handle) as module:
        before = len(memory.moves)
        out = module(x)
        streamed = memory.moves[before:]
    assert torch.equal(out, reference(x))
    assert models.stats["streamed"] == 1 and models.where(handle) == "cpu"
    # each unit goes to the GPU right before its forward and back right after: never two at once
    on_gpu, most = set(), 0
    for module, device, _ in streamed:
        (on_gpu.add if device == "cuda:0" else on_gpu.discard)(id(module))
        most = max(most, len(on_gpu))
    # units are the largest submodules within half the room: the two Linears, then the inner Sequential whole
    # (1.1 blocks); the ReLU has no weights
    units = [m for m, device, _ in streamed if device == "cuda:0"]
    assert most == 1 and units == [reference[0], reference[2], reference[3]]
    assert memory.moves[-1][1] == "cpu"  # everything home after the call


def test_a_cpu_model_over_budget_is_loaded_whole_after_evicting_the_rest():
    loads, models = Loads(), manager(cpu=100 * MiB)
    small, big = loads.handle("small", nbytes=10 * MiB), loads.handle("big", nbytes=200 * MiB, streamable=True)
    use(models, small)
    use(models, big)
    assert loaded_names(models) == ["big"] and models.stats["streamed"] == 0


def test_unload_all_and_unload_except():
    loads, models = Loads(), manager(cpu=1 * GiB)
    a, b = loads.handle("a"), loads.handle("b")
    use(models, a)
    use(models, b)
    assert models.unload_except({a}) == MODEL and loaded_names(models) == ["a"]
    with models.use(a):
        assert models.unload_all() == 0  # in use
    assert models.unload_all() == MODEL and models.loaded() == []


def test_out_of_memory_frees_idle_models_and_retries_once():
    loads, models = Loads(), manager(cpu=1 * GiB)
    a, b = loads.handle("a"), loads.handle("b")
    use(models, a)
    calls = []

    def node():
        calls.append(loaded_names(models))
        with models.use(b):
            if len(calls) == 1:
                raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes.")
            return "done"

    assert models.guard(node) == "done"
    assert calls == [["a"], []] and models.stats["oom_retries"] == 1


def test_out_of_memory_twice_says_what_was_needed_and_what_was_free():
    loads = Loads()
    models = ModelManager(FakeMemory(cuda_0=3 * GiB), reserves={"cuda": 0, "cpu": 0})
    b = loads.handle("unet", device="cuda:0", nbytes=2 * GiB)

    def node():
        with models.use(b, working=2 * GiB):
            raise MemoryError()

    with pytest.raises(OutOfMemory) as info:
        models.guard(node, what="node 5 (KSampler)")
    message = str(info.value)
    assert "node 5 (KSampler)" in message and "cuda:0" in message
    assert "needed about 4.00 GB (unet 2.00 GB + 2.00 GB working memory)" in message
    assert "3.00 GB was free" in message
    assert models.loaded() == [] and models.guard(lambda: 42) == 42  # nothing left in use: the next call is normal


def test_other_errors_are_not_retried():
    models, calls = manager(), []

    def node():
        calls.append(1)
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        models.guard(node)
    assert calls == [1]


def test_out_of_memory_errors_are_recognised():
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 40000000000 bytes. Error code 12"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_parse_bytes():
    assert parse_bytes("6G") == parse_bytes("6GB") == parse_bytes("6 GiB") == 6 * GiB
    assert parse_bytes("512m") == 512 * MiB and parse_bytes("1000") == 1000 and parse_bytes("1.5G") == 3 * GiB // 2
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_handles_in_finds_handles_in_node_values():
    a, b = ModelHandle("a"), ModelHandle("b")

    class Value:
        def model_handles(self):
            return (b,)

    assert handles_in([a, [Value(), 3], "text"]) == {a, b}


def test_torch_memory_reads_cuda_free_memory_from_the_driver_and_the_allocator(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * GiB, 8 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 256 * MiB)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    memory = TorchMemory()
    assert memory.free("cuda:0") == 3 * GiB + 768 * MiB  # free + what torch caches but does not use
    models = ModelManager(memory, budgets={"cuda": 2 * GiB})
    assert models.room("cuda") == 2 * GiB  # the budget is the tighter limit
    assert ModelManager(memory).room("cuda:0") == 3 * GiB + 768 * MiB - 768 * MiB  # minus the default reserve
    memory.release("cuda:0")
    assert emptied == [True]


def test_torch_memory_on_cpu_uses_available_ram():
    free = TorchMemory().free("cpu")
    assert 0 < free < 1 << 50


# --- through the executor: the plan's look-ahead and OOM recovery for a node ------------------------------------


class Resources:
    def __init__(self, models: ModelManager):
        self.models = models

    def around_node(self, *, definition, call, ctx):
        return self.models.run_node(call, ctx=ctx)


@pytest.fixture
def model_graph():
    """Load(name) -> a handle; Use(model) borrows it; Flaky(model) runs out of memory on its first call."""
    loads = Loads()
    failures = {"left": 0}
    registry = NodeRegistry()
    registry.register_type("FAKE_MODEL")

    @node("Load", inputs=[Input("name", "STRING")], outputs=[Output("model", "FAKE_MODEL")])
    def load(ctx, name):
        return loads.handle(name)

    @node("Use", output_node=True, cacheable=False, inputs=[Input("model", "FAKE_MODEL")], outputs=[])
    def use_node(ctx, model):
        with ctx.resources.models.use(model):
            pass
        return Result((), {"used": [model.name]})

    @node("Flaky", output_node=True, cacheable=False, inputs=[Input("model", "FAKE_MODEL")], outputs=[])
    def flaky(ctx, model):
        with ctx.resources.models.use(model):
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Result((), {"used": [model.name]})

    for definition in (load, use_node, flaky):
        registry.register(definition)
    return registry, loads, failures


def _uses(*steps: tuple[str, str]) -> dict:
    """Load nodes for each model name, then one node per step in a chain (each after the previous)."""
    api = {}
    for name in sorted({model for _, model in steps}):
        api[f"load_{name}"] = {"class_type": "Load", "inputs": {"name": name}}
    for i, (kind, model) in enumerate(steps):
        api[str(i + 1)] = {"class_type": kind, "inputs": {"model": [f"load_{model}", 0]}}
    return api


def test_the_plan_keeps_models_later_nodes_use(model_graph):
    registry, loads, _ = model_graph
    models = manager(cpu=150 * MiB)
    executor = Executor(registry, resources=Resources(models))
    # a, c, then b while a is needed again later: plain LRU would drop a (least recently used), the plan drops c
    api = _uses(("Use", "a"), ("Use", "c"), ("Use", "b"), ("Use", "a"))
    order = []
    report = executor.run(validate(api, registry).graph, listeners=[
        lambda e: order.append(e.node_id) if type(e).__name__ == "NodeStarted" and e.node_id.isdigit() else None])
    assert report.ok, report.error
    assert [report.ui[n]["used"][0] for n in order] == ["a", "c", "b", "a"]
    assert loads.count == {"a": 1, "b": 1, "c": 1}  # a was never read twice


def test_without_the_plan_lru_would_have_read_a_twice(model_graph):
    registry, loads, _ = model_graph
    models = manager(cpu=150 * MiB)

    class NoLookahead(Resources):
        def around_node(self, *, definition, call, ctx):
            return call()

    report = Executor(registry, resources=NoLookahead(models)).run(
        validate(_uses(("Use", "a"), ("Use", "c"), ("Use", "b"), ("Use", "a")), registry).graph)
    assert report.ok and loads.count["a"] == 2  # the contrast the look-ahead test relies on


def test_a_node_that_runs_out_of_memory_once_is_retried(model_graph):
    registry, loads, failures = model_graph
    models = manager(cpu=1 * GiB)
    executor = Executor(registry, resources=Resources(models))
    use(models, loads.handle("other"))
    failures["left"] = 1
    report = executor.run(validate(_uses(("Flaky", "a")), registry).graph)
    assert report.ok, report.error
    assert models.stats["oom_retries"] == 1 and "other" not in loaded_names(models)


def test_a_node_that_keeps_running_out_of_memory_fails_clearly_and_the_next_run_is_normal(model_graph):
    registry, loads, failures = model_graph
    models = manager(cpu=1 * GiB)
    executor = Executor(registry, resources=Resources(models))
    failures["left"] = 2
    report = executor.run(validate(_uses(("Flaky", "a")), registry).graph)
    assert report.status == "failed" and report.error.exception_type == "OutOfMemory"
    assert "needed about" in report.error.message and "was free" in report.error.message
    assert "the allocation that failed was 2.00 GB" in report.error.message
    again = executor.run(validate(_uses(("Flaky", "a")), registry).graph)
    assert again.ok, again.error


def test_a_node_that_exits_while_using_a_model_leaves_nothing_in_use(model_graph):
    """Issue #11: a node raising SystemExit fails its run, and the manager's state is clean afterwards."""
    registry, loads, _ = model_graph

    @node("Exits", output_node=True, cacheable=False, inputs=[Input("model", "FAKE_MODEL")], outputs=[])
    def exits(ctx, model):
        with ctx.resources.models.use(model):
            raise SystemExit(1)

    registry.register(exits)
    models = manager(cpu=1 * GiB)
    executor = Executor(registry, resources=Resources(models))
    report = executor.run(validate(_uses(("Exits", "a")), registry).graph)
    assert report.status == "failed" and report.error.exception_type == "SystemExit"
    assert [(m.name, m.in_use) for m in models.loaded()] == [("a", False)]
    assert executor.run(validate(_uses(("Use", "a")), registry).graph).ok
