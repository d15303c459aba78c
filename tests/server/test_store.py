"""QueueStore: ComfyUI's ordering and paging, durability across reopening, crash recovery."""

from __future__ import annotations

import json

import pytest

from service.queue import DatabaseInUse, QueueStore, StoreError
from service.worker import recover


def put(store: QueueStore, prompt_id: str, **kwargs) -> float:
    fields = {"prompt": {"1": {"class_type": "Show", "inputs": {"value": prompt_id}}}, "extra_data": {},
              "outputs": ["1"], "client_id": None, "number": None, "front": False, "max_pending": 100}
    fields.update(kwargs)
    return store.put(prompt_id=prompt_id, **fields)


def finish(store: QueueStore, prompt_id: str, status: str = "success") -> None:
    store.finish(prompt_id, number=0, status=status, attempts=1, entry={"prompt": [0, prompt_id], "outputs": {}})


@pytest.fixture
def store(tmp_path):
    opened = QueueStore(tmp_path / "q.sqlite3", max_history=5)
    yield opened
    opened.close()


def test_numbers_count_up_and_front_goes_first(store):
    assert [put(store, p) for p in "abc"] == [0, 1, 2]
    assert put(store, "urgent", front=True) == -3
    assert put(store, "explicit", number=1.5) == 1.5
    order = [store.claim().prompt_id for _ in range(5)]
    assert order == ["urgent", "a", "b", "explicit", "c"]
    assert store.claim() is None


def test_queue_json_has_comfyui_item_shape(store):
    put(store, "a", extra_data={"client_id": "me"}, client_id="me")
    put(store, "b")
    store.claim()
    queue = json.loads(store.queue_json())
    assert queue["queue_running"] == [[0, "a", {"1": {"class_type": "Show", "inputs": {"value": "a"}}},
                                       {"client_id": "me"}, ["1"]]]
    assert [item[1] for item in queue["queue_pending"]] == ["b"]
    assert store.remaining() == 2


def test_full_queue_and_duplicate_ids_are_refused(store):
    put(store, "a", max_pending=1)
    with pytest.raises(StoreError) as full:
        put(store, "b", max_pending=1)
    assert full.value.kind == "queue_full"
    with pytest.raises(StoreError) as duplicate:
        put(store, "a")
    assert duplicate.value.kind == "duplicate_prompt_id"
    store.claim()
    finish(store, "a")
    with pytest.raises(StoreError):  # a finished id stays taken while it is in the history
        put(store, "a")


def test_delete_and_clear_touch_only_pending(store):
    for p in "abcd":
        put(store, p)
    store.claim()  # a is running
    assert store.delete_pending(["a", "b", "zzz"]) == 1
    assert store.clear_pending() == 2
    assert json.loads(store.queue_json())["queue_running"][0][1] == "a"


def test_history_paging_and_limit(store):
    for p in "abcdefg":
        put(store, p)
        store.claim()
        finish(store, p)
    everything = json.loads(store.history_json())
    assert list(everything) == ["c", "d", "e", "f", "g"]  # max_history=5 keeps the newest
    assert list(json.loads(store.history_json(max_items=2))) == ["f", "g"]
    assert list(json.loads(store.history_json(max_items=2, offset=1))) == ["d", "e"]
    assert json.loads(store.history_entry_json("g"))["prompt"][1] == "g"
    assert store.history_entry_json("a") is None
    assert store.delete_history(["c", "nope"]) == 1
    assert store.clear_history() == 4


def test_state_survives_reopening_and_recovery_counts_attempts(tmp_path):
    path = tmp_path / "q.sqlite3"
    first = QueueStore(path)
    for p in ("done", "crashed", "waiting"):
        put(first, p)
    first.claim()
    finish(first, "done")
    assert first.claim().prompt_id == "crashed"  # then the process dies
    first.close()

    second = QueueStore(path)
    assert [item.prompt_id for item in second.running()] == ["crashed"]
    assert recover(second, max_attempts=2) == (["crashed"], [])
    item = second.claim()
    assert (item.prompt_id, item.attempts) == ("crashed", 2)
    second.close()  # dies again

    third = QueueStore(path)
    assert recover(third, max_attempts=2) == ([], ["crashed"])
    entry = json.loads(third.history_entry_json("crashed"))
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    kind, data = entry["status"]["messages"][-1]
    assert kind == "execution_error" and data["exception_type"] == "ServerCrashed"
    assert third.describe("crashed") == {"prompt_id": "crashed", "state": "failed", "number": 1, "attempts": 2}
    assert third.describe("waiting")["state"] == "pending"
    assert json.loads(third.history_entry_json("done"))["prompt"][1] == "done"
    third.close()


def test_clean_stop_requeues_without_counting_the_attempt(store):
    put(store, "a")
    store.claim()
    store.requeue("a", forget_attempt=True)
    assert store.claim().attempts == 1


def test_one_process_per_database(tmp_path):
    path = tmp_path / "q.sqlite3"
    first = QueueStore(path)
    with pytest.raises(DatabaseInUse, match="another sdgraph server"):
        QueueStore(path)
    first.close()
    QueueStore(path).close()


def test_non_finite_numbers_in_results_become_null(store):
    put(store, "a")
    store.claim()
    store.finish("a", number=0, status="success", attempts=1, entry={"outputs": {"1": {"x": [float("nan")]}}})
    assert json.loads(store.history_entry_json("a")) == {"outputs": {"1": {"x": [None]}}}
