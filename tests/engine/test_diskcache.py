"""The persistent output cache (issue #15): a new executor (a new process) reads what another one stored, entries
are checked and a damaged one is recomputed, concurrent writers, eviction under the size limit, a node version
bump misses, and no pickle (JSON codecs for primitives)."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest
from toy_nodes import CallCounter, toy_registry

from engine import Executor, NodeRegistry, validate
from engine.codecs import PRIMITIVE_CODECS, CodecError
from engine.diskcache import MAGIC, STORE_EVERYTHING, DiskCache, StorePolicy, format_entry, parse_entry
from engine.plan import CACHED, RUN, SKIP

GRAPH = {"1": {"class_type": "Const", "inputs": {"value": 3}},
         "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 4}},
         "3": {"class_type": "Mul", "inputs": {"a": ["2", 0], "b": 2}},
         "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}


def _with(api: dict, node_id: str, **inputs) -> dict:
    changed = json.loads(json.dumps(api))
    changed[node_id]["inputs"].update(inputs)
    return changed


def _process(root: Path, registry: NodeRegistry | None = None, policy: StorePolicy = STORE_EVERYTHING,
             max_bytes: int = 1 << 30) -> tuple[Executor, CallCounter]:
    """What a new process has: its own executor (empty memory, its own counter) on the shared directory."""
    counter = CallCounter()
    disk = DiskCache(root, max_bytes=max_bytes, policy=policy)
    return Executor(registry or toy_registry(), resources=counter, disk=disk), counter


def _run(executor: Executor, api: dict):
    result = validate(api, executor.registry)
    assert result.ok, [str(e) for e in result.errors]
    report = executor.run(result.graph)
    assert report.ok, report.error
    return report


def _plan(executor: Executor, api: dict):
    return executor.plan(validate(api, executor.registry).graph)


def test_a_second_process_takes_the_first_ones_results_from_disk_and_runs_only_the_output_node(tmp_path):
    first, _ = _process(tmp_path)
    run_id = _run(first, GRAPH).run_id
    second, counter = _process(tmp_path)
    plan = _plan(second, GRAPH)
    assert (plan["3"].status, plan["2"].status, plan["1"].status, plan["4"].status) == (CACHED, SKIP, SKIP, RUN)
    report = _run(second, GRAPH)
    assert counter.calls == {"Show": 1}  # an output node is not stored on disk: a new process shows again
    assert report.ui["4"] == {"text": ["14"]}  # (3 + 4) * 2, read from disk
    assert report.explain["3"].startswith(f"cached on disk (entry written by run {run_id} at ")
    assert report.explain["4"].startswith("ran: same inputs as its last run, but an output node")
    assert _run(second, GRAPH).explain["4"] == "cached in memory"  # the same process: memory first


def test_a_new_process_says_which_input_changed_since_the_stored_run(tmp_path):
    """--explain across processes: the key history is kept beside the entries."""
    first, _ = _process(tmp_path)
    _run(first, GRAPH)
    second, counter = _process(tmp_path)
    report = _run(second, _with(GRAPH, "2", b=5))
    assert report.explain["2"] == "ran: input 'b' changed (4 -> 5)"
    assert report.explain["3"] == "ran: input 'a' changed upstream"
    assert report.explain["1"].startswith("cached on disk")
    assert "Const" not in counter.calls and counter.calls["Add"] == 1


@pytest.mark.parametrize("damage", ["flip a header byte", "flip a blob byte", "truncate", "empty"])
def test_a_damaged_entry_is_dropped_and_the_node_and_its_inputs_are_computed(tmp_path, damage):
    first, _ = _process(tmp_path)
    _run(first, GRAPH)
    second, counter = _process(tmp_path)
    plan = _plan(second, GRAPH)
    for node_id in ("3", "2"):  # both: Mul must then compute Add, which must compute... Const, from disk
        path = second.disk.path(plan[node_id].key)
        data = bytearray(path.read_bytes())
        if damage == "flip a header byte":
            data[len(MAGIC) + 8 + 32 + 5] ^= 0x01
        elif damage == "flip a blob byte":
            data[-1] ^= 0x01
        elif damage == "truncate":
            data = data[:-1]
        else:
            data = bytearray()
        path.write_bytes(bytes(data))
    assert plan["3"].status == CACHED  # the file is there; reading it finds the damage
    report = _run(second, GRAPH)
    assert report.executed == ["2", "3", "4"] and report.cached == ["1"]
    assert counter.calls == {"Add": 1, "Mul": 1, "Show": 1}
    assert report.ui["4"] == {"text": ["14"]}  # never the damaged bytes
    assert second.disk.read(plan["3"].key) is not None  # recomputed and stored again, whole


def test_parse_entry_refuses_another_keys_entry_and_every_damage():
    data = format_entry({"key": "ab12", "types": ["INT"]}, [[b"14"]])
    assert parse_entry(data, "ab12").blobs == [[b"14"]]
    assert parse_entry(data, "cd34") is None  # a file renamed under another key is not that key's result
    for at in range(len(data)):
        damaged = bytearray(data)
        damaged[at] ^= 0x40
        assert parse_entry(bytes(damaged), "ab12") is None, at
        assert parse_entry(data[:at], "ab12") is None, at


def test_concurrent_writers_of_the_same_and_of_different_keys_leave_only_whole_entries(tmp_path):
    disk = DiskCache(tmp_path)
    barrier = threading.Barrier(8)

    def writer(n: int) -> None:
        barrier.wait()
        for i in range(20):
            disk.write("aa00", {"key": "aa00", "writer": n}, [[str(n).encode() * 1000]])
            disk.write(f"bb{n:02d}{i:02d}", {"key": f"bb{n:02d}{i:02d}"}, [[b"x" * i]])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared = disk.read("aa00")
    assert shared is not None and shared.blobs == [[str(shared.header["writer"]).encode() * 1000]]
    assert all(disk.read(f"bb{n:02d}{i:02d}") is not None for n in range(8) for i in range(20))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".part")]


def test_eviction_keeps_the_directory_under_its_size_least_recently_used_first(tmp_path):
    disk = DiskCache(tmp_path, max_bytes=8_000)  # three entries of ~2,300 bytes
    for age, key in enumerate(("aa01", "aa02", "aa03")):
        disk.write(key, {"key": key}, [[b"x" * 2000]])
        os.utime(disk.path(key), (1000 + age, 1000 + age))  # aa01 written first
    assert disk.read("aa01") is not None  # a hit makes it the most recently used
    disk.write("aa04", {"key": "aa04"}, [[b"x" * 2000]])  # four entries do not fit
    assert "aa02" not in disk and all(key in disk for key in ("aa01", "aa03", "aa04"))
    assert disk.nbytes <= disk.max_bytes


def test_eviction_tolerates_entries_vanishing_under_it(tmp_path):
    class Racing(DiskCache):
        def entries(self):
            found = super().entries()
            for _, _, path in found:
                path.unlink()  # another process evicts everything meanwhile
            return found

    disk = Racing(tmp_path, max_bytes=10)
    for key in ("aa01", "aa02"):
        DiskCache(tmp_path).write(key, {"key": key}, [[b"x" * 100]])
    assert len(disk.evict()) == 2


def test_a_node_version_bump_misses_and_its_old_entries_age_out(tmp_path):
    first, _ = _process(tmp_path)
    old = _plan(first, GRAPH)
    _run(first, GRAPH)
    bumped = NodeRegistry()
    for name, info in ((t, toy_registry().type_info(t)) for t in toy_registry().known_types):
        bumped.register_type(name, description=info.description)
    for definition in toy_registry():
        bumped.register(dataclasses.replace(definition, version="2") if definition.name == "Add" else definition)
    second, counter = _process(tmp_path, bumped)
    plan = _plan(second, GRAPH)
    assert (plan["1"].status, plan["2"].status, plan["3"].status) == (CACHED, RUN, RUN)
    report = _run(second, GRAPH)
    assert report.explain["2"] == f"ran: node type/version changed (Add v{old['2'].parts.version} -> Add v2)"
    assert counter.calls["Add"] == 1 and "Const" not in counter.calls
    old_add = second.disk.path(old["2"].key)
    assert old_add.exists()  # never hit again; the least recently used goes first
    second.disk.max_bytes = second.disk.nbytes - 1
    assert second.disk.evict() == [old_add]


def test_results_too_quick_to_be_worth_storing_or_without_a_codec_stay_in_memory(tmp_path):
    executor, _ = _process(tmp_path, policy=StorePolicy())  # the default: toy nodes take microseconds
    _run(executor, GRAPH)
    assert executor.disk.entries() == []
    assert StorePolicy().worth_storing(0.02, 250_000) and not StorePolicy().worth_storing(0.004, 10)
    boxes, _ = _process(tmp_path / "boxes")
    _run(boxes, {"1": {"class_type": "MakeBox", "inputs": {"value": 2}},
                 "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})
    assert boxes.disk.entries() == []  # BOX has no codec


def test_entries_are_json_and_safetensors_never_pickle(tmp_path):
    """The header and the primitives' blobs are JSON; primitives round-trip exactly, anything else is refused."""
    executor, _ = _process(tmp_path)
    plan = _plan(executor, GRAPH)
    _run(executor, GRAPH)
    entry = executor.disk.read(plan["3"].key)
    assert entry.header["node_type"] == "Mul" and entry.header["types"] == ["INT"] and entry.header["run_id"]
    assert entry.header["constants"] == {"b": "2"} and entry.blobs == [[b"14"]]
    for type_name, value in (("INT", 3), ("FLOAT", 0.1), ("STRING", "a\u00e9"), ("BOOLEAN", True)):
        codec = PRIMITIVE_CODECS[type_name]
        assert codec.load(codec.dump(value)) == value and type(codec.load(codec.dump(value))) is type(value)
    for type_name, value in (("INT", True), ("INT", (1, 2)), ("STRING", object())):
        with pytest.raises(CodecError):
            PRIMITIVE_CODECS[type_name].dump(value)


def test_the_saved_key_history_is_bounded_and_merges_what_other_processes_saved(tmp_path):
    from engine.cache import KeyParts
    from engine.tiers import StoredKeyHistory

    path = tmp_path / "history.json"
    one, other = StoredKeyHistory(path, max_saved=3), StoredKeyHistory(path, max_saved=3)
    parts = [KeyParts("Add", "1", {"b": str(n)}, {}, "") for n in range(5)]
    one.record("a", parts[0])
    other.record("b", parts[1])
    one.save()
    other.save()  # does not lose "a", which the other process saved meanwhile
    assert StoredKeyHistory(path).last("a") == parts[0] and StoredKeyHistory(path).last("b") == parts[1]
    for n, node_id in enumerate("cde"):
        one.record(node_id, parts[n])
    one.save()
    again = StoredKeyHistory(path)
    assert again.last("a") is None and [again.last(n) for n in "cde"] == parts[:3]
    path.write_text("{not json")
    assert StoredKeyHistory(path).last("c") is None  # an unreadable history only costs explanations


def test_eviction_deletes_temporary_files_of_writes_that_died_long_ago(tmp_path):
    disk = DiskCache(tmp_path)
    disk.write("aa01", {"key": "aa01"}, [[b"x"]])
    dead, fresh = (disk.path("aa01").parent / f".aa02.entry.{name}.part" for name in ("abcd1234", "efgh5678"))
    dead.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(dead, (1000, 1000))
    disk.evict()
    assert not dead.exists() and fresh.exists() and "aa01" in disk


def test_entries_of_other_code_are_never_returned(tmp_path):
    """A result computed by other code (an edited sampler whose node version was not bumped, an upgrade) is not
    returned: entries are filed under the key and the code's digest (`source_digest`)."""
    from engine.diskcache import DiskCache, source_digest

    sources = tmp_path / "pack"
    sources.mkdir()
    (sources / "node.py").write_text("VALUE = 1\n")
    before = source_digest([sources])
    (sources / "node.py").write_text("VALUE = 2\n")
    after = source_digest([sources])
    assert before != after and after == source_digest([sources])
    key = "ab" * 16
    DiskCache(tmp_path / "cache", code=before).write(key, {"key": key, "blobs": []}, [])
    assert key in DiskCache(tmp_path / "cache", code=before)
    assert key not in DiskCache(tmp_path / "cache", code=after)


def test_a_quick_result_made_from_a_model_is_stored(tmp_path):
    """Recomputing a result made from a value without a codec (a loaded model) needs that model in a new process:
    it is stored however quick the call was (the second prompt encoding, with the text encoder already loaded)."""
    from engine.cache import About, CachedOutput, KeyParts, OutputCache
    from engine.diskcache import DiskCache
    from engine.tiers import TieredCache

    registry = NodeRegistry()
    registry.register_type("HANDLE")  # no codec, as MODEL/CLIP/VAE
    tiers = TieredCache(OutputCache(), DiskCache(tmp_path), registry)
    parts = KeyParts("Encode", "1", {}, {}, "")
    quick = CachedOutput(([7],), None, 8)
    tiers.put("aa" * 16, quick, About(parts, ("INT",), "run", 0.0, input_types=("INT",)))
    tiers.put("bb" * 16, quick, About(parts, ("INT",), "run", 0.0, input_types=("HANDLE",)))
    assert "aa" * 16 not in tiers.disk and "bb" * 16 in tiers.disk
