"""Issue #16's routing, without a cluster: the model files a prompt needs, the affinity and round-robin policies,
memory limits, retries away from a lost worker, the sweep syntax; and Ray is never imported without --ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine import GraphFormatError
from service.affinity import Candidate, ModelFile, RoundRobin, WorkerView, choose_affinity, eligible, unroutable
from service.dispatch import Router
from service.queue import QueueStore
from service.sweep import expand, parse_axis

REPO = Path(__file__).resolve().parents[2]
A = ModelFile("/m/a.safetensors", 100, 1)
B = ModelFile("/m/b.safetensors", 100, 2)
HUGE = ModelFile("/m/xl.safetensors", 10_000, 3)


def view(name, holds=(), *, free=500, capacity=1000, busy=False):
    return WorkerView(name, frozenset(holds), capacity, free, busy)


def test_a_free_worker_takes_the_prompt_whose_models_it_holds_before_the_head():
    workers = [view("w1", [A]), view("w2", [B], busy=True)]
    route = choose_affinity("w1", [Candidate("p1", (B,)), Candidate("p2", (A,))], workers)
    assert route.prompt_id == "p2" and route.reason.startswith("holds its models")


def test_without_a_holder_the_free_worker_with_most_free_memory_gets_it():
    workers = [view("w1", free=100), view("w2", free=900)]
    assert choose_affinity("w1", [Candidate("p1", (A,))], workers) is None  # w2 suits it better
    route = choose_affinity("w2", [Candidate("p1", (A,))], workers)
    assert route.prompt_id == "p1" and "most free memory" in route.reason


def test_a_model_bigger_than_a_worker_never_goes_there():
    workers = [view("small", capacity=500, free=500), view("big", capacity=50_000, free=10, busy=True)]
    assert eligible(Candidate("p", (HUGE,)), workers) == [workers[1]]
    assert choose_affinity("small", [Candidate("p", (HUGE,))], workers) is None  # waits for the big one
    assert unroutable(Candidate("p", (HUGE,)), workers[:1]).reason.startswith("its models need 10000 bytes")


def test_a_prompt_lost_on_a_worker_is_retried_elsewhere():
    workers = [view("w1", [A], free=900), view("w2", free=100)]
    lost = Candidate("p", (A,), avoid=frozenset({"w1"}))
    assert choose_affinity("w1", [lost], workers) is None
    assert choose_affinity("w2", [lost], workers).prompt_id == "p"


def test_the_head_is_not_passed_over_for_ever():
    workers = [view("w1", [A])]
    head = Candidate("pb", (B,), skipped=8)
    assert choose_affinity("w1", [head, Candidate("pa", (A,))], workers, patience=8).prompt_id == "pb"


def test_round_robin_takes_turns_whatever_the_workers_hold():
    rr, workers = RoundRobin(), [view("w1", [A]), view("w2", [B])]
    heads = [Candidate("p1", (A,)), Candidate("p2", (A,))]
    assert rr.choose("w2", heads, workers) is None
    assert rr.choose("w1", heads, workers).prompt_id == "p1"
    assert rr.choose("w2", heads[1:], workers).prompt_id == "p2"


def _queue(tmp_path, needs):
    store = QueueStore(tmp_path / "q.sqlite3")
    for pid in needs:
        store.put(prompt_id=pid, prompt={}, extra_data={}, outputs=[], client_id=None, number=None, front=False,
                  max_pending=100)
    return store


def test_the_router_claims_by_affinity_and_records_its_decisions(tmp_path):
    needs = {"p1": (A,), "p2": (B,), "p3": (A,)}
    store = _queue(tmp_path, needs)
    router = Router(store, needs=lambda item: needs[item.prompt_id])
    woken = []
    router.register(view("w1", [B], free=100), lambda: woken.append("w1"))
    router.register(view("w2", [A], free=100), lambda: woken.append("w2"))
    assert router.claim("w1").prompt_id == "p2"
    assert router.claim("w2").prompt_id == "p1"
    assert store.describe("p1")["state"] == "running" and store.describe("p3")["state"] == "pending"
    state = router.state()
    assert state["decisions"]["p2"] == {"worker": "w1", "reason": "holds its models (b.safetensors)"}
    assert [w["name"] for w in state["workers"] if w["busy"]] == ["w1", "w2"]


def test_the_router_fails_a_prompt_no_worker_has_the_memory_for(tmp_path):
    store = _queue(tmp_path, ["big", "ok"])
    failed = []
    router = Router(store, needs=lambda item: (HUGE,) if item.prompt_id == "big" else (A,),
                    on_unroutable=lambda item, reason: (failed.append((item.prompt_id, reason)),
                                                        store.finish(item.prompt_id, number=item.number,
                                                                     status="failed", attempts=1, entry={})))
    router.register(view("w1", capacity=1000), lambda: None)
    assert router.claim("w1").prompt_id == "ok"
    assert failed[0][0] == "big" and "largest worker has 1000 bytes" in failed[0][1]


def test_sweep_axes_parse_ranges_lists_and_make_products():
    assert parse_axis("3.seed=1..4").values == ("1", "2", "3", "4")
    assert parse_axis("6.text=a cat,a dog").values == ("a cat", "a dog")
    api = {"3": {"class_type": "K", "inputs": {"seed": 0}}, "6": {"class_type": "T", "inputs": {"text": ""}}}
    prompts = expand(api, [parse_axis("3.seed=1..2"), parse_axis("6.text=x,y")])
    assert [p[0] for p in prompts] == [("3.seed=1", "6.text=x"), ("3.seed=1", "6.text=y"),
                                      ("3.seed=2", "6.text=x"), ("3.seed=2", "6.text=y")]
    assert prompts[3][1]["3"]["inputs"]["seed"] == 2 and prompts[3][1]["6"]["inputs"]["text"] == "y"
    for bad in ("seed=1..3", "3.seed=4..1", "3.seed=a..b", "3.seed="):
        with pytest.raises(GraphFormatError, match="--sweep"):
            parse_axis(bad)
    with pytest.raises(GraphFormatError, match="no node '9'"):
        expand(api, [parse_axis("9.seed=1")])


def test_the_server_and_the_cli_do_not_import_ray_without_the_flag():
    code = "import sys, server, cli; cli._parser(); sys.exit(1 if 'ray' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PYTHONPATH": str(REPO)}).returncode == 0


def test_a_sweep_without_ray_runs_every_combination_here(tmp_path, capsys):
    import json
    import shutil

    import cli

    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "server" / "toy_server_nodes.py", base / "custom_nodes")
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps({"1": {"class_type": "ToySaveImage", "inputs": {"value": 0, "filename_prefix": "s"}}}))
    code = cli.main(["run", str(graph), "--base-dir", str(base), "--sweep", "1.value=1..3",
                     "--sweep", "1.filename_prefix=x,y", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["prompts"]
    assert [r["values"] for r in rows][:2] == [["1.value=1", "1.filename_prefix=x"],
                                               ["1.value=1", "1.filename_prefix=y"]]
    assert all(r["status"] == "success" and r["worker"] == "here" for r in rows) and len(rows) == 6
    assert sorted(p.name for p in (base / "output").iterdir()) == [f"{p}_0000{i}_.png" for p in "xy" for i in (1, 2, 3)]
    assert cli.main(["run", str(graph), "--base-dir", str(base), "--sweep", "1.value=3..1"]) == 2


class LosingExecutor:
    """Stands for a remote worker whose process dies under every prompt."""

    resources = None

    def __init__(self, retry: bool):
        self.retry = retry

    def run(self, graph, **_):
        from service.worker import WorkerLost
        raise WorkerLost("worker w1 (pid 42) died while running the prompt: ActorDiedError", retry=self.retry)


@pytest.mark.parametrize("retry", [True, False])
def test_a_prompt_whose_worker_died_is_requeued_once_then_failed_with_the_reason(tmp_path, retry):
    import json
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "tests" / "engine"))
    from toy_nodes import toy_registry

    from engine import CancelToken
    from service.worker import Worker

    store = QueueStore(tmp_path / "q.sqlite3")
    store.put(prompt_id="p", prompt={"1": {"class_type": "Const", "inputs": {"value": 1}},
                                     "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}},
              extra_data={}, outputs=["2"], client_id=None, number=None, front=False, max_pending=10)
    worker = Worker(store=store, executor=LosingExecutor(retry), registry=toy_registry(), hub=None)
    item = store.claim()
    worker._run(SimpleNamespace(item=item, token=CancelToken(), node=None, for_shutdown=False, abandoned=False))
    if retry:
        assert store.describe("p") == {"prompt_id": "p", "state": "pending", "number": 0, "attempts": 1,
                                       "position": 0}
    else:
        assert store.describe("p")["state"] == "failed"
        error = dict(json.loads(store.history_entry_json("p"))["status"]["messages"])["execution_error"]
        assert error["exception_type"] == "WorkerLost" and "pid 42" in error["exception_message"]


def test_ray_flags_without_ray_installed_say_how_to_install_it(monkeypatch):
    import importlib.util

    from service.options import build_parser, config_from_args

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'sdgraph\[ray\]'"):
        config_from_args(build_parser().parse_args(["--ray", "auto"]))
    assert config_from_args(build_parser().parse_args([])).scale_out is None


def test_passing_over_the_head_counts_only_when_no_worker_holds_its_models(tmp_path):
    """With two workers each holding one model, the busy holder of the head's model takes it next: the free one
    must not flip to the head's model after `patience` prompts (that reloaded models in the benchmark)."""
    needs = {f"p{i}": ((B,) if i % 2 == 0 else (A,)) for i in range(20)}
    store = _queue(tmp_path, needs)
    router = Router(store, needs=lambda item: needs[item.prompt_id], patience=2)
    router.register(view("wa", [A]), lambda: None)
    router.register(view("wb", [B], busy=True), lambda: None)
    taken = [router.claim("wa").prompt_id for _ in range(5)]  # wb stays busy: its B prompts wait for it
    assert taken == ["p1", "p3", "p5", "p7", "p9"]
    router.retire("wb")  # now nobody holds B: the head is passed over `patience` times at most
    assert [router.claim("wa").prompt_id for _ in range(3)] == ["p11", "p13", "p0"]


def test_a_worker_is_free_for_routing_as_soon_as_its_prompt_is_finished(tmp_path):
    """A prompt queued between a worker finishing and claiming again goes to the worker holding its models: the
    other free worker must not see the holder as busy and take it (the Ray test's once-in-a-while failure)."""
    from service.dispatch import RoutedStore

    needs = {"p1": (A,), "p2": (A,)}
    store = _queue(tmp_path, ["p1"])
    router = Router(store, needs=lambda item: needs[item.prompt_id])
    router.register(view("w1", [A], free=100), lambda: None)
    router.register(view("w2", free=900), lambda: None)
    holder = RoutedStore(store, router, "w1")
    item = holder.claim()
    assert item.prompt_id == "p1"
    holder.finish("p1", number=item.number, status="success", attempts=1, entry={})
    store.put(prompt_id="p2", prompt={}, extra_data={}, outputs=[], client_id=None, number=None, front=False,
              max_pending=100)  # queued before w1's loop claims again
    assert router.claim("w2") is None  # w1 holds A and is free: w2 leaves p2 to it
    assert router.claim("w1").prompt_id == "p2"
