"""The `sdgraph` command line, run as a subprocess on toy nodes: outputs, messages and exit codes."""

from __future__ import annotations

import io
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SDGRAPH = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())"]
TOY_NODES = ROOT / "tests" / "engine" / "toy_nodes.py"

GRAPH = {"1": {"class_type": "Const", "inputs": {"value": 3}},
         "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 4}},
         "3": {"class_type": "SaveText", "inputs": {"text": ["2", 0], "filename_prefix": "sum"}}}


@pytest.fixture
def home(tmp_path) -> Path:
    """A base folder with the toy nodes as a pack in packs/ and a broken pack beside them."""
    (tmp_path / "packs").mkdir()
    (tmp_path / "packs" / "toy.py").symlink_to(TOY_NODES)
    (tmp_path / "packs" / "broken").mkdir()
    (tmp_path / "packs" / "broken" / "__init__.py").write_text("import a_requirement_not_installed\n")
    return tmp_path


def _graph(home: Path, api: dict, name: str = "graph.json") -> str:
    path = home / name
    path.write_text(json.dumps(api))
    return str(path)


def sdgraph(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [*SDGRAPH, args[0], "--base-dir", str(home), "--nodes-dir", str(home / "packs"), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_validate_ok(home):
    done = sdgraph(home, "validate", _graph(home, GRAPH))
    assert (done.returncode, done.stdout) == (0, "ok: 3 nodes, outputs 3\n")
    done = sdgraph(home, "validate", _graph(home, GRAPH), "--json")
    assert json.loads(done.stdout) == {"ok": True, "nodes": 3, "outputs": ["3"]}


def test_validate_lists_every_error_and_exits_2(home):
    bad = {"1": {"class_type": "Const", "inputs": {"value": "abc"}},
           "2": {"class_type": "Add", "inputs": {"a": ["9", 0]}},
           "3": {"class_type": "Nope", "inputs": {}}}
    done = sdgraph(home, "validate", _graph(home, bad))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == "the graph has 3 problem(s):"
    assert lines[1:] == [
        "  - node 1 (Const): input 'value' expects a whole number, got 'abc' [invalid_input_type]",
        "  - node 2 (Add): input 'a' is linked to node '9', which is not in the graph; link it to an existing node "
        "[bad_linked_input]",
        "  - node 3 (Nope): there is no node type 'Nope'; install the pack that defines it or fix the name "
        "(`sdgraph nodes` lists the known ones; `sdgraph nodes --errors` shows packs that failed to load) "
        "[unknown_node_type]"]
    done = sdgraph(home, "validate", _graph(home, bad), "--json")
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert [(e["code"], e["node_id"], e["input_name"]) for e in report["errors"]] == [
        ("invalid_input_type", "1", "value"), ("bad_linked_input", "2", "a"), ("unknown_node_type", "3", None)]


def test_validate_does_not_import_torch(home):
    script = (f"import sys, cli; rc = cli.main(['validate', {_graph(home, GRAPH)!r}, '--base-dir', {str(home)!r}, "
              f"'--nodes-dir', {str(home / 'packs')!r}]); print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.splitlines()[-1] == "0 False", done.stderr


def test_run_writes_files_and_prints_their_paths(home):
    done = sdgraph(home, "run", _graph(home, GRAPH))
    assert done.returncode == 0, done.stderr
    written = home / "output" / "sum_00001.txt"
    assert done.stdout == f"{written}\n"
    assert written.read_text() == "7"


def test_run_json_set_and_out(home):
    out = home / "elsewhere"
    done = sdgraph(home, "run", _graph(home, GRAPH), "--set", "1.value=10", "--set", "3.filename_prefix=ten",
                   "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "success" and result["error"] is None
    assert result["files"] == [str(out / "ten_00001.txt")]
    assert sorted(result["executed"]) == ["1", "2", "3"] and result["cached"] == []
    assert result["ui"] == {"3": {"files": [{"filename": "ten_00001.txt", "subfolder": "", "type": "output"}]}}
    assert (out / "ten_00001.txt").read_text() == "14"
    assert not (home / "output").exists()


def test_run_only_one_node(home):
    done = sdgraph(home, "run", _graph(home, GRAPH), "--only", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["executed"]) == ["1", "2"]
    assert not (home / "output").exists()
    done = sdgraph(home, "run", _graph(home, GRAPH), "--only", "7")
    assert done.returncode == 2 and "there is no node '7' in the graph to run" in done.stderr


def test_run_explain(home):
    done = sdgraph(home, "run", _graph(home, GRAPH), "--explain")
    assert done.returncode == 0
    assert "node 1 (Const): ran: no earlier result for this node" in done.stderr.splitlines()


SLOW_GRAPH = {"1": {"class_type": "Const", "inputs": {"value": 3}},
              "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 1, "delay": 0.05}},
              "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 4}},
              "4": {"class_type": "SaveText", "inputs": {"text": ["3", 0], "filename_prefix": "sum"}}}


def test_a_second_process_takes_the_slow_result_from_disk_and_explains_why_the_rest_ran(home):
    """Issue #15: the disk cache (BASE/user/cache) across `sdgraph run` processes, and --explain across them."""
    graph = _graph(home, SLOW_GRAPH)
    first = sdgraph(home, "run", graph, "--json")
    assert sorted(json.loads(first.stdout)["executed"]) == ["1", "2", "3", "4"], first.stderr
    assert list((home / "user" / "cache" / "entries").rglob("*.entry"))  # the 50 ms node was worth storing
    second = sdgraph(home, "run", graph, "--json", "--explain")
    result = json.loads(second.stdout)
    assert result["executed"] == ["3", "4"] and result["cached"] == ["2"], second.stderr  # Add is too quick
    lines = second.stderr.splitlines()
    assert any(line.startswith("node 2 (Slow): cached on disk (entry written by run ") for line in lines), lines
    assert any(line.startswith("node 1 (Const): skipped") for line in lines), lines
    assert (home / "output" / "sum_00002.txt").read_text() == "7"
    third = sdgraph(home, "run", graph, "--explain", "--set", "3.b=5")
    assert "node 3 (Add): ran: input 'b' changed (4 -> 5)" in third.stderr.splitlines(), third.stderr
    assert (home / "output" / "sum_00003.txt").read_text() == "8"


def test_no_disk_cache_and_cache_dir(home):
    graph = _graph(home, SLOW_GRAPH)
    for _ in range(2):
        done = sdgraph(home, "run", graph, "--json", "--no-disk-cache")
        assert "2" in json.loads(done.stdout)["executed"], done.stderr
    assert not (home / "user" / "cache").exists()
    elsewhere = home / "shared-cache"
    for expected in (["1", "2", "3", "4"], ["3", "4"]):
        done = sdgraph(home, "run", graph, "--json", "--cache-dir", str(elsewhere), "--cache-size", "1G")
        assert json.loads(done.stdout)["executed"] == expected, done.stderr
    assert (elsewhere / "history.json").is_file() and not (home / "user" / "cache").exists()
    done = sdgraph(home, "run", graph, "--cache-size", "lots")
    assert done.returncode == 2 and "--cache-size" in done.stderr


def test_a_failing_node_exits_1(home):
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}},
           "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
           "3": {"class_type": "SaveText", "inputs": {"text": ["2", 0]}}}
    done = sdgraph(home, "run", _graph(home, api))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == "error: node 2 (Fail) failed: ValueError: toy failure on 3"
    done = sdgraph(home, "run", _graph(home, api), "--json")
    error = json.loads(done.stdout)["error"]
    assert (error["node_id"], error["exception_type"], error["message"]) == ("2", "ValueError", "toy failure on 3")
    assert "Traceback" in error["traceback"]


def test_invalid_input_exits_2(home):
    done = sdgraph(home, "run", _graph(home, {"1": {"class_type": "Const", "inputs": {"value": 5000}}}))
    assert done.returncode == 2
    assert "value_bigger_than_max" in done.stderr and "prompt_no_outputs" in done.stderr
    assert sdgraph(home, "run", str(home / "missing.json")).returncode == 2
    done = sdgraph(home, "run", _graph(home, GRAPH), "--set", "1value=3")
    assert done.returncode == 2 and "write it as NODE_ID.INPUT=VALUE" in done.stderr
    (home / "bad.json").write_text("{")
    done = sdgraph(home, "validate", str(home / "bad.json"))
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "not valid JSON" in done.stderr


def test_ctrl_c_exits_130_without_a_partial_file(home):
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}},
           "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 200, "delay": 0.05}},
           "3": {"class_type": "SaveText", "inputs": {"text": ["2", 0]}}}
    command = [*SDGRAPH, "run", _graph(home, api), "--base-dir", str(home), "--nodes-dir", str(home / "packs")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + 30
    while b"2 Slow" not in seen and time.monotonic() < deadline:  # the progress bar: the run is under way
        if selector.select(timeout=1):
            seen += os.read(process.stderr.fileno(), 4096)
    assert b"2 Slow" in seen, seen
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert time.monotonic() - started < 5  # stopped at the next progress check, not after 200 steps
    assert (seen + stderr).decode().rstrip().endswith("interrupted")
    assert stdout == b""
    output = home / "output"
    assert not output.exists() or list(output.iterdir()) == []


def test_nodes_lists_errors_of_broken_packs(home):
    done = sdgraph(home, "nodes", "--errors")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    at = lines.index("broken: 0 nodes registered, 1 problem")
    assert lines[at + 1].startswith("  __init__.py: ModuleNotFoundError: No module named "
                                    "'a_requirement_not_installed'")
    errors = json.loads(sdgraph(home, "nodes", "--errors", "--json").stdout)
    assert [e["pack"] for e in errors] == ["broken"]


def test_nodes_lists_and_describes_node_types(home):
    done = sdgraph(home, "nodes")
    assert done.returncode == 0
    assert any(line.split() == ["toy", "Const"] for line in done.stdout.splitlines())
    info = json.loads(sdgraph(home, "nodes", "--json").stdout)
    assert info["Const"]["input"]["required"]["value"] == ["INT", {"default": 0, "min": -1000, "max": 1000}]
    assert info["Const"]["python_module"] == "custom_nodes.toy"


def test_convert_prints_the_api_form(home):
    workflow = {"nodes": [{"id": 1, "type": "Const", "mode": 0, "widgets_values": [6],
                           "outputs": [{"name": "value", "type": "INT", "links": [1]}]},
                          {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}],
                           "outputs": [{"name": "", "type": "INT", "links": [2]}]},
                          {"id": 3, "type": "SaveText", "title": "Keep", "widgets_values": ["six"],
                           "inputs": [{"name": "text", "type": "*", "link": 2}]}],
                "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"]]}
    done = sdgraph(home, "convert", _graph(home, workflow, "workflow.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "1": {"class_type": "Const", "inputs": {"value": 6}, "_meta": {"title": "Const"}},
        "3": {"class_type": "SaveText", "inputs": {"filename_prefix": "six", "text": ["1", 0]},
              "_meta": {"title": "Keep"}}}
    run = sdgraph(home, "run", str(home / "workflow.json"))  # workflows run directly too
    assert run.returncode == 0 and (home / "output" / "six_00001.txt").read_text() == "6"


def test_progress_on_a_non_terminal_is_a_few_plain_lines(home):
    """Issue #11: on a pipe or log file the progress is plain lines (first step, each tenth, last), no \\r frames."""
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}},
           "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 200}},
           "3": {"class_type": "SaveText", "inputs": {"text": ["2", 0]}}}
    done = sdgraph(home, "run", _graph(home, api))
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("2 Slow: ")]
    assert lines == ["2 Slow: 1/200"] + [f"2 Slow: {20 * k}/200" for k in range(1, 11)]


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from cli import _ProgressBar
    from engine import NodeStarted, Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    bar = _ProgressBar(stream)
    bar(NodeStarted(run_id="r", node_id="2", node_type="Slow"))
    for step in range(1, 51):
        bar(Progress(run_id="r", node_id="2", value=step, max=50))
    bar.close()
    assert "2 Slow" in stream.getvalue() and "50/50" in stream.getvalue() and "100%" in stream.getvalue()


SLOW = {"1": {"class_type": "Const", "inputs": {"value": 3}},
        "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 400, "delay": 0.05}},
        "3": {"class_type": "SaveText", "inputs": {"text": ["2", 0]}}}
STUCK_PACK = '''
import time
from engine import INT, Input, Output, node

@node("Stuck", category="test", inputs=[Input("seconds", INT, default=120)], outputs=[Output("value", INT)])
def stuck(ctx, seconds):
    time.sleep(seconds)  # never checks for interruption, as a node stuck in C code
    return seconds

NODES = [stuck]
'''


def test_prompt_timeout_stops_the_run_and_exits_124(home):
    """Issue #11: no time limit per prompt. The run stops at the node's next check after --prompt-timeout."""
    started = time.monotonic()
    done = sdgraph(home, "run", _graph(home, SLOW), "--prompt-timeout", "1", "--json")
    assert done.returncode == 124, done.stderr
    assert time.monotonic() - started < 15  # not the 20 s the graph would take
    assert "error: the prompt exceeded its time limit of 1 s (--prompt-timeout)" in done.stderr
    assert json.loads(done.stdout)["error"]["exception_type"] == "PromptTimeout"
    assert not (home / "output").exists() or list((home / "output").iterdir()) == []


def test_a_node_stuck_past_the_timeout_grace_exits_124(home):
    """A node that never checks cannot be stopped from Python: after the grace period the CLI exits anyway."""
    (home / "packs" / "stuck.py").write_text(STUCK_PACK)
    api = {"1": {"class_type": "Stuck", "inputs": {"seconds": 120}}, "2": {"class_type": "SaveText",
                                                                          "inputs": {"text": ["1", 0]}}}
    started = time.monotonic()
    done = sdgraph(home, "run", _graph(home, api), "--prompt-timeout", "1", "--prompt-timeout-grace", "1")
    assert done.returncode == 124, done.stderr
    assert time.monotonic() - started < 20
    assert "did not stop within 1 s more" in done.stderr


def test_prompt_timeout_must_be_seconds(home):
    done = sdgraph(home, "run", _graph(home, GRAPH), "--prompt-timeout", "nan")
    assert done.returncode == 2 and "expected a number of seconds" in done.stderr


def test_convert_and_run_accept_a_workflow_with_nested_subgraphs(home):
    """Issue #18: subgraph workflows convert to the front end's own prompt (the fixture) and run."""
    fixtures = ROOT / "tests" / "fixtures" / "subgraphs"
    path = str(fixtures / "nested.workflow.json")
    done = sdgraph(home, "convert", path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads((fixtures / "nested.prompt.json").read_text())
    run = sdgraph(home, "run", path)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(("extra", "single"), [((), True), (("--sweep", "1.value=1,2"), False)])
def test_run_of_one_graph_keeps_no_model_for_a_next_prompt(home, monkeypatch, extra, single):
    """Issue #17 (3 GB by default): `sdgraph run` of one graph runs one prompt and exits, so its model manager
    drops an idle model no later node uses rather than raise the peak; a sweep runs several and keeps them."""
    import cli
    from nodes import runtime as runtime_module

    made = []
    real = runtime_module.Runtime
    monkeypatch.setattr(runtime_module, "Runtime", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    args = cli._parser().parse_args(["run", "--base-dir", str(home), "--nodes-dir", str(home / "packs"),
                                     "--out", str(home / "out"), _graph(home, GRAPH), *extra])
    assert args.handler(args) == 0
    assert [r.models.next_prompt for r in made] == [not single]
