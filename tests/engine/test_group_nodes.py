"""Issue #18: workflows with group nodes (`extra.groupNodes`, the older format) flatten as frontend 1.58 queues
them: it turns each group node into a subgraph when it loads the file, and its prompt is the oracle's
(tests/fixtures/group-nodes, made in Chromium by tools/frontend_oracle.py). Toy nodes, hand-written groups."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from engine import COMBO, INT, GraphFormatError, Input, NodeRegistry, Output, node, validate, workflow_to_api

FIXTURES = Path(__file__).parents[1] / "fixtures" / "group-nodes"


@node("Noise", category="toy", inputs=[Input("seed", INT, default=0, min=0, max=2**32, control_after_generate=True),
                                       Input("style", COMBO, options=("soft", "hard")), Input("strength", INT,
                                                                                          default=1)],
      outputs=[Output("value", INT)])
def noise(ctx, seed, style, strength):
    return seed * strength


def group_registry() -> NodeRegistry:
    """The toy nodes, Noise (a seed widget followed by its control_after_generate widget, a combo) and the stubs
    of ComfyUI's core nodes."""
    import comfy_core_stub
    from toy_nodes import toy_registry

    from engine.discovery import register_module
    registry = toy_registry()
    registry.register(noise)
    register_module(registry, comfy_core_stub, pack="comfy_core_stub")
    return registry


@pytest.fixture
def registry() -> NodeRegistry:
    return group_registry()


def _inner(index, kind, widgets, *, inputs=(), outputs=(), mode=0):
    return {"id": 100 + index, "type": kind, "pos": [300 * index, 0], "size": [240, 80], "flags": {},
            "order": index, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
            "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets), "index": index}


def _out(name, links):
    return {"name": name, "type": "INT", "links": links, "slot_index": 0}


def _widget_input(name, link=None):
    return {"name": name, "type": "INT", "link": link, "widget": {"name": name}}


def adders_group(*, converted=False, inner_mode=0) -> dict:
    """Add(a, b) -> Mul(a, b): Add's output feeds Mul's a; Mul's output leaves the group. With `converted`,
    Add's widget `a` was converted to an input before grouping (the group then has an input socket `a`)."""
    add_inputs = [_widget_input("a")] if converted else []
    return {"nodes": [_inner(0, "Add", [1, 2], inputs=add_inputs, outputs=[_out("sum", [])], mode=inner_mode),
                      _inner(1, "Mul", [1, 3], inputs=[_widget_input("a", 0)], outputs=[_out("product", [])])],
            "links": [[0, 0, 1, 0, 100, "INT"]], "external": [[1, 0, "INT"]]}


def _node(node_id, kind, widgets, *, inputs=(), outputs=(), mode=0):
    return {"id": node_id, "type": kind, "pos": [0, 200 * node_id], "size": [240, 80], "flags": {},
            "order": node_id, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
            "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets)}


def _workflow(nodes, links, groups) -> dict:
    last = max(n["id"] for n in nodes)
    return {"last_node_id": last, "last_link_id": max([link[0] for link in links], default=0), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"groupNodes": groups}, "version": 0.4}


def one_group(*, converted=False, inner_mode=0, linked=True) -> dict:
    """Const(1) -> [Adders] -> Show: the group's widgets b, "Mul b" (and a, when converted, linked from Const)."""
    group = _node(2, "workflow>Adders", [20, 30] + ([5] if converted else []),
                  inputs=[_widget_input("a", 1 if linked else None)] if converted else [],
                  outputs=[_out("product", [2])])
    nodes = [_node(1, "Const", [7], outputs=[_out("value", [1] if converted and linked else [])]), group,
             _node(3, "Show", [], inputs=[{"name": "value", "type": "*", "link": 2}])]
    links = ([[1, 1, 0, 2, 0, "INT"]] if converted and linked else []) + [[2, 2, 0, 3, 0, "INT"]]
    return _workflow(nodes, links, {"Adders": adders_group(converted=converted, inner_mode=inner_mode)})


def two_instances() -> dict:
    """Two instances of one group in a chain: [Adders] -> [Adders] -> Show, with their own widget values."""
    first = _node(2, "workflow>Adders", [20, 30, 5], inputs=[_widget_input("a")], outputs=[_out("product", [1])])
    second = _node(4, "workflow>Adders", [40, 50, 6], inputs=[_widget_input("a", 1)], outputs=[_out("product", [2])])
    nodes = [first, second, _node(3, "Show", [], inputs=[{"name": "value", "type": "*", "link": 2}])]
    links = [[1, 2, 0, 4, 0, "INT"], [2, 4, 0, 3, 0, "INT"]]
    return _workflow(nodes, links, {"Adders": adders_group(converted=True)})


def two_instances_listed_in_reverse() -> dict:
    """As `two_instances`, the later instance (id 4) first in the workflow's node list: the front end converts
    instances in list order, so it gets the lower pasted ids."""
    workflow = two_instances()
    workflow["nodes"][0], workflow["nodes"][1] = workflow["nodes"][1], workflow["nodes"][0]
    return workflow


def nested() -> dict:
    """A group whose nodes include an instance of another group: Outer = [Adders] -> Mul."""
    inner_instance = _inner(0, "workflow>Adders", [20, 30], outputs=[_out("product", [])])
    outer = {"nodes": [inner_instance, _inner(1, "Mul", [1, 4], inputs=[_widget_input("a", 0)],
                                              outputs=[_out("product", [])])],
             "links": [[0, 0, 1, 0, 100, "INT"]], "external": [[1, 0, "INT"]]}
    group = _node(2, "workflow>Outer", [8, 9], outputs=[_out("product", [2])])
    nodes = [group, _node(3, "Show", [], inputs=[{"name": "value", "type": "*", "link": 2}])]
    return _workflow(nodes, [[2, 2, 0, 3, 0, "INT"]], {"Adders": adders_group(), "Outer": outer})


def socket_group(*, widget_first: bool, link_b: bool = False) -> dict:
    """MakeBox(5) -> [Unbox -> Add] -> Show: the group has a socket input `box` (Unbox's, not a widget) and the
    widget `b` (Add's); `widget_first` puts Add before Unbox in the group's node list (its widget then comes
    first among the group's inputs, while the socket is still the group's input number 0)."""
    unbox = {"index": 0, "type": "Unbox", "inputs": [{"name": "box", "type": "BOX", "link": None}],
             "outputs": [_out("value", [])], "widgets": []}
    add = {"index": 1, "type": "Add", "inputs": [_widget_input("a", 0)], "outputs": [_out("sum", [])],
           "widgets": [1, 2]}
    order = [add, unbox] if widget_first else [unbox, add]
    for position, member in enumerate(order):
        member["index"] = position
    u, a = order.index(unbox), order.index(add)
    group_nodes = [_inner(n["index"], n["type"], n["widgets"], inputs=n["inputs"], outputs=n["outputs"])
                   for n in order]
    group = {"nodes": group_nodes, "links": [[u, 0, a, 0, 100 + u, "INT"]], "external": [[a, 0, "INT"]]}
    instance_inputs = [{"name": "box", "type": "BOX", "link": 1}]
    if link_b:
        instance_inputs.append(_widget_input("b", 3))
    instance = _node(2, "workflow>Boxes", [9], inputs=instance_inputs, outputs=[_out("sum", [2])])
    nodes = [_node(1, "MakeBox", [5], outputs=[{"name": "box", "type": "BOX", "links": [1], "slot_index": 0}]),
             instance, _node(3, "Show", [], inputs=[{"name": "value", "type": "*", "link": 2}])]
    links = [[1, 1, 0, 2, 0, "BOX"], [2, 2, 0, 3, 0, "INT"]]
    if link_b:
        nodes.append(_node(4, "Const", [11], outputs=[_out("value", [3])]))
        links.append([3, 4, 0, 2, 1, "INT"])
    return _workflow(nodes, links, {"Boxes": group})


def all_converted() -> dict:
    """Const(7), Const(8) -> [Add with both widgets converted to inputs] -> Show: the group's inputs a and b are its
    first widgets, so the front end keeps both links (compare `converted-widget`, where it drops the link)."""
    group = {"nodes": [_inner(0, "Add", [1, 2], inputs=[_widget_input("a"), _widget_input("b")],
                              outputs=[_out("sum", [])])], "links": [], "external": []}
    instance = _node(2, "workflow>Sum", [3, 4], inputs=[_widget_input("a", 1), _widget_input("b", 3)],
                     outputs=[_out("sum", [2])])
    nodes = [_node(1, "Const", [7], outputs=[_out("value", [1])]), instance,
             _node(3, "Show", [], inputs=[{"name": "value", "type": "*", "link": 2}]),
             _node(4, "Const", [8], outputs=[_out("value", [3])])]
    links = [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"], [3, 4, 0, 2, 1, "INT"]]
    return _workflow(nodes, links, {"Sum": group})


def three_adds(title: str | None = None) -> dict:
    """Add -> Add -> Add in one group: the names the front end gives repeated inputs ("Add b", "Add 2 b"); with
    `title`, the last Add is renamed (its inputs then "TITLE b")."""
    adds = [_inner(0, "Add", [1, 2], outputs=[_out("sum", [])]),
            _inner(1, "Add", [3, 4], inputs=[_widget_input("a", 0)], outputs=[_out("sum", [])]),
            _inner(2, "Add", [5, 6], inputs=[_widget_input("a", 1)], outputs=[_out("sum", [])])]
    if title:
        adds[2]["title"] = title
    group = {"nodes": adds, "links": [[0, 0, 1, 0, 100, "INT"], [1, 0, 2, 0, 101, "INT"]],
             "external": [[2, 0, "INT"]]}
    instance = _node(2, "workflow>Chain", [10, 20, 30, 40], outputs=[_out("sum", [2])])
    nodes = [instance, _node(3, "Show", [], inputs=[{"name": "value", "type": "*", "link": 2}])]
    return _workflow(nodes, [[2, 2, 0, 3, 0, "INT"]], {"Chain": group})


def seeded() -> dict:
    """A group of Noise -> Add: the group's widgets are seed, its control widget, style, strength, b; the
    instance's values hold the control word after the seed."""
    group = {"nodes": [_inner(0, "Noise", [5, "fixed", "soft", 2], outputs=[_out("value", [])]),
                       _inner(1, "Add", [0, 1], inputs=[_widget_input("a", 0)], outputs=[_out("sum", [])])],
             "links": [[0, 0, 1, 0, 100, "INT"]], "external": [[0, 0, "INT"]]}
    instance = _node(2, "workflow>Seeded", [123, "randomize", "hard", 3, 9],
                     outputs=[_out("value", [3]), _out("sum", [2])])
    nodes = [instance, _node(3, "Show", [], inputs=[{"name": "value", "type": "*", "link": 2}]),
             _node(4, "Show", [], inputs=[{"name": "value", "type": "*", "link": 3}])]
    return _workflow(nodes, [[2, 2, 1, 3, 0, "INT"], [3, 2, 0, 4, 0, "INT"]], {"Seeded": group})


def virtual_inside(kind: str) -> dict:
    """A PrimitiveNode (42) or a Reroute inside the group, feeding Add's a: Const(7) -> [kind -> Add] -> Show; a
    Reroute's input comes from outside (the group's input)."""
    if kind == "PrimitiveNode":
        first = _inner(0, "PrimitiveNode", [42, "fixed"],
                       outputs=[{"name": "INT", "type": "INT", "links": [], "widget": {"name": "a"}}])
        first["title"] = "count"
    else:
        first = _inner(0, "Reroute", [], inputs=[{"name": "", "type": "*", "link": None}],
                       outputs=[{"name": "", "type": "INT", "links": []}])
    group = {"nodes": [first, _inner(1, "Add", [1, 2], inputs=[_widget_input("a", 0)], outputs=[_out("sum", [])])],
             "links": [[0, 0, 1, 0, 100, "INT"]], "external": [[1, 0, "INT"]]}
    linked = kind == "Reroute"
    instance_inputs = [{"name": "INT", "type": "INT", "link": 1}] if linked else []
    instance = _node(2, f"workflow>With{kind}", [5, 6, 7], inputs=instance_inputs, outputs=[_out("sum", [2])])
    nodes = [_node(1, "Const", [7], outputs=[_out("value", [1] if linked else [])]), instance,
             _node(3, "Show", [], inputs=[{"name": "value", "type": "*", "link": 2}])]
    links = ([[1, 1, 0, 2, 0, "INT"]] if linked else []) + [[2, 2, 0, 3, 0, "INT"]]
    return _workflow(nodes, links, {f"With{kind}": group})


def with_subgraph() -> dict:
    """A subgraph (its inner ids 1 and 3 clash with the root's, so the front end renumbers them when it loads the
    file) next to a group node: the group's pasted ids come after the renumbered ones."""
    from test_subgraphs import adder_workflow
    workflow = adder_workflow(b_value=40)
    sub = workflow["definitions"]["subgraphs"][0]
    for inner in sub["nodes"]:
        inner["id"] = {1: 1, 2: 3}[inner["id"]]
    for link in sub["links"]:
        link["origin_id"] = {2: 3}.get(link["origin_id"], link["origin_id"])
        link["target_id"] = {2: 3}.get(link["target_id"], link["target_id"])
    group = one_group()
    for member in group["nodes"]:
        member["id"] += 10
        member["pos"] = [member["pos"][0], 600]
    workflow["nodes"].insert(0, {**group["nodes"][0], "id": 1, "type": "Const", "widgets_values": [2],
                                 "outputs": [_out("value", [])]})
    workflow["nodes"] += [group["nodes"][1], group["nodes"][2]]
    workflow["nodes"][-1]["inputs"][0]["link"] = 12
    workflow["nodes"][-2]["outputs"][0]["links"] = [12]
    workflow["links"].append([12, 12, 0, 13, 0, "INT"])
    workflow["extra"] = group["extra"]
    workflow["last_node_id"] = 13
    return workflow


def _socket(name, kind, link=None):
    return {"name": name, "type": kind, "link": link}


def txt2img(*, config: bool = False) -> dict:
    """A whole text-to-image graph as one group (ComfyUI's core nodes, stubs), SaveImage outside: widgets of six
    nodes, two prompts (one titled), the seed's control widget, a combo; with `config`, the group's own names."""
    members = [
        ("CheckpointLoaderSimple", ["v1-5-pruned-emaonly.safetensors"], []),
        ("CLIPTextEncode", ["a cat"], [_socket("clip", "CLIP")]),
        ("CLIPTextEncode", ["blurry"], [_socket("clip", "CLIP")]),
        ("EmptyLatentImage", [512, 512, 1], []),
        ("KSampler", [42, "randomize", 20, 8.0, "euler", "normal", 1.0],
         [_socket("model", "MODEL"), _socket("positive", "CONDITIONING"), _socket("negative", "CONDITIONING"),
          _socket("latent_image", "LATENT")]),
        ("VAEDecode", [], [_socket("samples", "LATENT"), _socket("vae", "VAE")]),
    ]
    inner = [_inner(i, kind, widgets, inputs=inputs, outputs=[]) for i, (kind, widgets, inputs) in enumerate(members)]
    inner[2]["title"] = "Negative"
    links = [[0, 1, 1, 0, 100, "CLIP"], [0, 1, 2, 0, 100, "CLIP"], [0, 0, 4, 0, 100, "MODEL"],
             [1, 0, 4, 1, 101, "CONDITIONING"], [2, 0, 4, 2, 102, "CONDITIONING"], [3, 0, 4, 3, 103, "LATENT"],
             [4, 0, 5, 0, 104, "LATENT"], [0, 2, 5, 1, 100, "VAE"]]
    group = {"nodes": inner, "links": links, "external": []}
    if config:
        group["config"] = {"4": {"input": {"steps": {"name": "Steps"}, "cfg": {"name": "CFG"}}},
                           "1": {"input": {"text": {"name": "positive"}}}}
    values = ["v1-5-pruned-emaonly-fp16.safetensors", "a dog", "ugly", 640, 448, 2, 7, "fixed", 25, 6.5,
              "dpmpp_2m", "karras", 0.9]
    instance = _node(1, "workflow>Txt2Img", values, outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}])
    save = _node(2, "SaveImage", ["grouped"], inputs=[_socket("images", "IMAGE", 1)])
    return _workflow([instance, save], [[1, 1, 0, 2, 0, "IMAGE"]], {"Txt2Img": group})


def crossed() -> dict:
    """Const -> the instance's plain widget socket `b`, in a group whose converted widget `a` the front end numbers
    0: it re-makes the link from socket 0 (`b`) into Add's a."""
    workflow = one_group(converted=True)
    workflow["nodes"][1]["inputs"] = [_widget_input("b", 1), _widget_input("Mul b"), _widget_input("a")]
    workflow["links"][0] = [1, 1, 0, 2, 0, "INT"]
    return workflow


def every_widget_an_input() -> dict:
    """As saved by front ends 1.16+ (before group nodes went): every widget also has an input entry, so the
    front end treats them all as converted widgets: no plain widgets, and a link into `b` reaches Add's b."""
    workflow = one_group()
    add, mul = workflow["extra"]["groupNodes"]["Adders"]["nodes"]
    add["inputs"] = [_widget_input("a"), _widget_input("b")]
    mul["inputs"] = [_widget_input("a", 0), _widget_input("b")]
    instance = workflow["nodes"][1]
    instance["inputs"] = [_widget_input("a"), _widget_input("b", 1), _widget_input("Mul b")]
    instance["widgets_values"] = [20, 30, 40]
    workflow["nodes"][0]["outputs"][0]["links"] = [1]
    workflow["links"].insert(0, [1, 1, 0, 2, 1, "INT"])
    return workflow


def hidden(kind: str) -> dict:
    """The group's config hides its socket `box` ("input") or its output ("output"): the front end then drops
    the link into it (or out of it)."""
    workflow = socket_group(widget_first=False)
    config = {"input": {"box": {"visible": False}}} if kind == "input" else {"output": {"0": {"visible": False}}}
    workflow["extra"]["groupNodes"]["Boxes"]["config"] = {"0" if kind == "input" else "1": config}
    return workflow


def unknown_inner() -> dict:
    """A group holding a node type the server does not have."""
    workflow = one_group()
    workflow["extra"]["groupNodes"]["Adders"]["nodes"][0]["type"] = "NoSuchNode"
    return workflow


def instance_mode(mode: int) -> dict:
    """The group node itself muted (2) or bypassed (4)."""
    workflow = one_group(converted=True)
    workflow["nodes"][1]["mode"] = mode
    return workflow


def cases() -> dict[str, dict]:
    """The hand-written workflows whose front-end prompts are in tests/fixtures/group-nodes (regenerate with
    `python tests/engine/test_group_nodes.py` then tools/frontend_oracle.py, see the README there)."""
    return {"one-group": one_group(), "converted-widget": one_group(converted=True),
            "converted-widget-unlinked": one_group(converted=True, linked=False),
            "inner-bypassed": one_group(converted=True, inner_mode=4),
            "inner-muted": one_group(converted=True, inner_mode=2),
            "two-instances": two_instances(), "nested": nested(),
            "two-instances-reversed": two_instances_listed_in_reverse(),
            "socket-input": socket_group(widget_first=False), "all-converted": all_converted(),
            "socket-after-widget": socket_group(widget_first=True),
            "socket-and-linked-widget": socket_group(widget_first=False, link_b=True),
            "legacy-separator": _legacy(one_group()), "three-adds": three_adds(), "seeded": seeded(),
            "instance-muted": instance_mode(2), "instance-bypassed": instance_mode(4),
            "titled": three_adds(title="Last"), "primitive-inside": virtual_inside("PrimitiveNode"),
            "reroute-inside": virtual_inside("Reroute"), "with-subgraph": with_subgraph(),
            "txt2img": txt2img(), "txt2img-config": txt2img(config=True), "hidden-input": hidden("input"),
            "hidden-output": hidden("output"), "crossed": crossed(), "every-widget-an-input": every_widget_an_input()}


def _legacy(workflow: dict) -> dict:
    """The oldest files name group node types "workflow/NAME"."""
    workflow = copy.deepcopy(workflow)
    for ui_node in workflow["nodes"]:
        ui_node["type"] = ui_node["type"].replace("workflow>", "workflow/")
    return workflow


@pytest.mark.parametrize("name", sorted(cases()))
def test_group_nodes_convert_as_the_front_end_does(name, registry):
    """Each case against the prompt frontend 1.58 made of it in Chromium (tools/frontend_oracle.py): inner ids
    "subgraph:inner" after the pasted ids, widget values, links in and out (and those it drops)."""
    expected = json.loads((FIXTURES / f"{name}.prompt.json").read_text())
    assert workflow_to_api(cases()[name], registry) == expected


def test_a_group_of_node_types_the_server_lacks_is_refused_naming_them(registry):
    """The front end shows such an instance as a missing node and queues it with class_type null (its prompt is
    in tests/fixtures/group-nodes/unknown-inner.prompt.json); we say what is missing instead."""
    with pytest.raises(GraphFormatError, match="node 2: group node 'Adders' holds node types this server does not "
                                               r"have \(NoSuchNode\)"):
        workflow_to_api(unknown_inner(), registry)


def test_a_group_inside_a_group_defined_later_is_refused(registry):
    """The front end registers groups in file order, so Outer (listed before Adders) holds an unknown type and is
    queued as a missing node (class_type null, checked in the browser); we name what is missing."""
    workflow = nested()
    groups = workflow["extra"]["groupNodes"]
    workflow["extra"]["groupNodes"] = {"Outer": groups["Outer"], "Adders": groups["Adders"]}
    with pytest.raises(GraphFormatError, match=r"group node 'Outer' holds node types .*\(workflow>Adders\)"):
        workflow_to_api(workflow, registry)


def test_an_instance_of_an_undefined_group_is_refused(registry):
    workflow = one_group()
    workflow["nodes"][1]["type"] = "workflow>Missing"
    with pytest.raises(GraphFormatError, match="node 2: group node type 'workflow>Missing' has no definition"):
        workflow_to_api(workflow, registry)


@pytest.mark.parametrize(("change", "message"), [
    (lambda g: g.update(nodes={"0": {}}), r"group node 'Adders': extra.groupNodes\['Adders'\] must hold a 'nodes'"),
    (lambda g: g["links"].append([0, 0, 7, 0, 1, "INT"]), r"group node 'Adders': link \[0, 0, 7, 0, 1, 'INT'\] is not "
                                                        r"\[origin index, origin slot, target index"),
    (lambda g: g["nodes"].append(3), r"group node 'Adders': each of its 'nodes' must be a node"),
])
def test_a_broken_group_is_refused_naming_it(change, message, registry):
    workflow = one_group()
    change(workflow["extra"]["groupNodes"]["Adders"])
    with pytest.raises(GraphFormatError, match=message):
        workflow_to_api(workflow, registry)


def test_a_converted_group_validates(registry):
    api = workflow_to_api(one_group(), registry)
    assert sorted(api) == ["1", "3", "6:4", "6:5"]
    result = validate(api, registry)
    assert result.ok, [str(e) for e in result.errors]


if __name__ == "__main__":  # write the cases for the oracle
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for case, workflow in cases().items():
        (FIXTURES / f"{case}.workflow.json").write_text(json.dumps(workflow, indent=1) + "\n")
    sys.exit(0)
