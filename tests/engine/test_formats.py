"""Graph formats: API JSON, the front end's workflow JSON (real exports and a hand-written one), PNG chunks."""

from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path

import pytest

from engine import (
    BOOLEAN,
    INT,
    STRING,
    Executor,
    GraphFormatError,
    Input,
    Output,
    apply_overrides,
    read_graph_file,
    to_api,
    validate,
    workflow_to_api,
)
from engine import node as declare
from engine.formats import png_text_chunks

FIXTURES = Path(__file__).parents[1] / "fixtures" / "comfyui-workflows"


def _load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


# -- workflows exported by ComfyUI's front end --------------------------------------------------------------

def test_default_workflow_converts_to_the_api_format(sd_registry):
    api = workflow_to_api(_load("default.json"), sd_registry)
    # _meta titles are the display names (the front end's node titles) unless a node was renamed
    assert api == {
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]},
              "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "6": {"class_type": "CLIPTextEncode",
              "inputs": {"text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
                         "clip": ["4", 1]},
              "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1},
              "_meta": {"title": "EmptyLatentImage"}},
        # [seed, control (true: an old file), steps, cfg, sampler, scheduler, denoise]
        "3": {"class_type": "KSampler",
              "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
                         "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0],
                         "negative": ["7", 0], "latent_image": ["5", 0]},
              "_meta": {"title": "KSampler"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
              "_meta": {"title": "VAE Decode"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}, "_meta": {"title": "Save Image"}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"},
              "_meta": {"title": "CheckpointLoaderSimple"}},
    }
    result = validate(api, sd_registry)
    assert result.ok, [str(e) for e in result.errors]
    assert result.graph.outputs == ("9",)
    assert result.graph["9"].inputs["filename_prefix"] == "ComfyUI"  # omitted widget: its default
    assert result.graph["3"].inputs["cfg"] == 8.0 and isinstance(result.graph["3"].inputs["cfg"], float)


def test_incomplete_exports_convert_then_fail_validation_with_every_missing_input(sd_registry):
    api = workflow_to_api(_load("load_image_with_ksampler.json"), sd_registry)
    # LoadImage's second value ("image") belongs to the upload button; "randomize" is the seed's control
    assert api["1"]["inputs"] == {"image": "example.png"}
    assert api["2"]["inputs"] == {"seed": 0, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                                  "denoise": 1}
    errors = sorted((e.code, e.node_id, e.input_name) for e in validate(api, sd_registry).errors)
    assert errors == [("prompt_no_outputs", None, None)] + [
        ("required_input_missing", "2", name) for name in ("latent_image", "model", "negative", "positive")]


def test_notes_are_dropped(sd_registry):
    api = workflow_to_api(_load("note_with_ksampler.json"), sd_registry)
    assert list(api) == ["1"]
    assert api["1"]["inputs"]["seed"] == 42 and api["1"]["inputs"]["steps"] == 20


# -- a workflow written by hand from the documented schema ----------------------------------------------------

@declare("Tag", category="toy", inputs=[Input("text", STRING), Input("count", INT)], outputs=[Output("count", INT)])
def tag(ctx, text, count):
    return count


def _slot(name, kind, link=None, widget=False):
    slot = {"name": name, "type": kind, "link": link}
    if widget:
        slot["widget"] = {"name": name}
    return slot


def _out(name, kind, links):
    return {"name": name, "type": kind, "links": links}


HAND_WRITTEN = {
    "last_node_id": 14, "last_link_id": 12, "version": 0.4, "groups": [], "config": {}, "extra": {},
    "nodes": [
        {"id": 1, "type": "Const", "mode": 0, "inputs": [], "outputs": [_out("value", "INT", [1, 9])],
         "widgets_values": [5]},
        {"id": 10, "type": "Reroute", "mode": 0, "inputs": [_slot("", "*", 1)], "outputs": [_out("", "INT", [2])],
         "properties": {"showOutputText": False, "horizontal": False}},
        {"id": 2, "type": "PrimitiveNode", "mode": 0, "title": "b value",
         "outputs": [{**_out("INT", "INT", [3]), "widget": {"name": "b"}}], "widgets_values": [7, "fixed"]},
        {"id": 3, "type": "Add", "mode": 0, "title": "Sum",
         "inputs": [_slot("a", "INT", 2, widget=True), _slot("b", "INT", 3, widget=True)],
         "outputs": [_out("sum", "INT", [4])], "widgets_values": [0, 0]},
        {"id": 4, "type": "Mul", "mode": 2, "inputs": [], "outputs": [_out("product", "INT", [6])],
         "widgets_values": [2, 3]},
        {"id": 5, "type": "Show", "mode": 0, "inputs": [_slot("value", "*", 6)], "outputs": []},
        {"id": 6, "type": "Tag", "mode": 4, "inputs": [_slot("text", "STRING", 7), _slot("count", "INT", 4)],
         "outputs": [_out("count", "INT", [8])], "widgets_values": []},
        {"id": 7, "type": "Concat", "mode": 0, "inputs": [], "outputs": [_out("text", "STRING", [7])],
         "widgets_values": ["a", "b", False]},
        {"id": 8, "type": "Mul", "mode": 0, "inputs": [_slot("a", "INT", 8, widget=True)],
         "outputs": [_out("product", "INT", [12])], "widgets_values": [1, 4]},
        {"id": 9, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["remember the milk"]},
        {"id": 11, "type": "Format", "mode": 4, "inputs": [_slot("number", "INT", 9)],
         "outputs": [_out("text", "STRING", [10])], "widgets_values": ["hex"]},
        {"id": 12, "type": "Concat", "mode": 0, "inputs": [_slot("left", "STRING", 10, widget=True)],
         "outputs": [_out("text", "STRING", [11])], "widgets_values": ["kept", "!", True]},
        {"id": 13, "type": "Show", "mode": 0, "title": "Shout", "inputs": [_slot("value", "*", 11)], "outputs": []},
        {"id": 14, "type": "Show", "mode": 0, "inputs": [_slot("value", "*", 12)], "outputs": []},
    ],
    "links": [[1, 1, 0, 10, 0, "INT"], [2, 10, 0, 3, 0, "INT"], [3, 2, 0, 3, 1, "INT"], [4, 3, 0, 6, 1, "INT"],
              [6, 4, 0, 5, 0, "INT"], [7, 7, 0, 6, 0, "STRING"], [8, 6, 0, 8, 0, "INT"], [9, 1, 0, 11, 0, "INT"],
              [10, 11, 0, 12, 0, "STRING"], [11, 12, 0, 13, 0, "STRING"], [12, 8, 0, 14, 0, "INT"]],
}

HAND_WRITTEN_API = {
    "1": {"class_type": "Const", "inputs": {"value": 5}, "_meta": {"title": "Const"}},
    # a through the Reroute to Const 1; b from the PrimitiveNode's value
    "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 7}, "_meta": {"title": "Sum"}},
    # fed only by the muted Mul 4: the input is dropped (validation reports it)
    "5": {"class_type": "Show", "inputs": {}, "_meta": {"title": "Show"}},
    "7": {"class_type": "Concat", "inputs": {"left": "a", "right": "b", "upper": False}, "_meta": {"title": "Concat"}},
    # Tag 6 is bypassed: its INT output passes on its INT input (count, not the same-position STRING text)
    "8": {"class_type": "Mul", "inputs": {"a": ["3", 0], "b": 4}, "_meta": {"title": "Mul"}},
    # Format 11 is bypassed but has no STRING input: the link leads nowhere, the widget keeps its own value
    "12": {"class_type": "Concat", "inputs": {"left": "kept", "right": "!", "upper": True},
           "_meta": {"title": "Concat"}},
    "13": {"class_type": "Show", "inputs": {"value": ["12", 0]}, "_meta": {"title": "Shout"}},
    "14": {"class_type": "Show", "inputs": {"value": ["8", 0]}, "_meta": {"title": "Show"}},
}


@pytest.fixture
def reg(registry):
    registry.register(tag)
    return registry


def test_hand_written_workflow(reg, counter):
    api = workflow_to_api(HAND_WRITTEN, reg)
    assert api == HAND_WRITTEN_API
    errors = [(e.code, e.node_id, e.input_name) for e in validate(api, reg).errors]
    assert errors == [("required_input_missing", "5", "value")]
    result = validate(api, reg, targets=["13", "14"])
    report = Executor(reg, resources=counter).run(result.graph)
    assert report.ui == {"13": {"text": ["KEPT!"]}, "14": {"text": ["48"]}}  # (5 + 7) * 4


def test_links_as_objects_convert_the_same(reg):
    workflow = copy.deepcopy(HAND_WRITTEN)
    workflow["links"] = [{"id": link[0], "origin_id": link[1], "origin_slot": link[2], "target_id": link[3],
                          "target_slot": link[4], "type": link[5]} for link in workflow["links"]]
    workflow["version"] = 1
    assert workflow_to_api(workflow, reg) == HAND_WRITTEN_API


def test_conversion_does_not_touch_the_workflow(reg):
    workflow = copy.deepcopy(HAND_WRITTEN)
    workflow_to_api(workflow, reg)
    assert workflow == HAND_WRITTEN


@declare("Seeded", category="toy", inputs=[Input("seed", INT, default=0, control_after_generate=True),
                                           Input("flag", BOOLEAN, default=False)],
         outputs=[Output("seed", INT)])
def seeded(ctx, seed, flag):
    return seed


@pytest.mark.parametrize("values, expected", [
    ([5, "randomize", True], {"seed": 5, "flag": True}),
    ([5, True, False], {"seed": 5, "flag": False}),  # old files: a bool control, skipped by position
    ([5, True], {"seed": 5, "flag": True}),  # no control value saved: True is the flag
    ([5, "increment"], {"seed": 5}),
    ([5, "fixed", True, "extra"], {"seed": 5, "flag": True}),  # trailing front-end-only values are ignored
    ([5], {"seed": 5}),
])
def test_control_after_generate_values_are_not_inputs(registry, values, expected):
    registry.register(seeded)
    workflow = {"nodes": [{"id": 1, "type": "Seeded", "widgets_values": values}], "links": []}
    assert workflow_to_api(workflow, registry)["1"]["inputs"] == expected


def test_list_widget_values_and_named_widget_values(registry):
    workflow = {"nodes": [{"id": 1, "type": "Show", "widgets_values": {"value": [1, 2]}},
                          {"id": 2, "type": "Concat", "widgets_values": {"left": "x", "upper": True, "junk": 1}}],
                "links": []}
    api = workflow_to_api(workflow, registry)
    assert api["1"]["inputs"] == {"value": {"__value__": [1, 2]}}
    assert api["2"]["inputs"] == {"left": "x", "upper": True}
    assert validate(api, registry, targets=["1"]).graph["1"].inputs["value"] == [1, 2]


def test_aliases_are_accepted_in_workflows(sd_registry):
    workflow = {"nodes": [{"id": 4, "type": "LoadCheckpoint",
                           "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
                          {"id": 5, "type": "Show", "inputs": [_slot("value", "*", 1)]}],
                "links": [[1, 4, 0, 5, 0, "MODEL"]]}
    api = workflow_to_api(workflow, sd_registry)
    assert api["4"] == {"class_type": "LoadCheckpoint", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
                        "_meta": {"title": "LoadCheckpoint"}}
    result = validate(api, sd_registry)
    assert result.ok and result.graph["4"].type == "CheckpointLoaderSimple"


def test_not_a_workflow(registry):
    with pytest.raises(GraphFormatError, match="not a ComfyUI workflow"):
        workflow_to_api({"nodes": [{"type": "Const"}]}, registry)
    with pytest.raises(GraphFormatError, match="link \\[1, 2\\] is not"):
        workflow_to_api({"nodes": [], "links": [[1, 2]]}, registry)


# -- files ----------------------------------------------------------------------------------------------------

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(*chunks: bytes) -> bytes:
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    pixels = _chunk(b"IDAT", zlib.compress(b"\x00\x00"))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(chunks) + pixels + _chunk(b"IEND", b"")


API = {"1": {"class_type": "Const", "inputs": {"value": 3}}, "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}


def test_png_with_a_prompt_chunk(tmp_path, registry):
    path = tmp_path / "out.png"
    path.write_bytes(_png(_chunk(b"tEXt", b"prompt\0" + json.dumps(API).encode()),
                          _chunk(b"tEXt", b"workflow\0" + json.dumps(HAND_WRITTEN).encode())))
    assert read_graph_file(path, registry) == API  # the prompt is preferred: it is what ran


def test_png_with_only_a_workflow_chunk(tmp_path, reg):
    compressed = zlib.compress(json.dumps(HAND_WRITTEN).encode())
    path = tmp_path / "itxt.png"
    path.write_bytes(_png(_chunk(b"iTXt", b"workflow\0\x01\x00\0\0" + compressed)))
    assert read_graph_file(path, reg) == HAND_WRITTEN_API
    path.write_bytes(_png(_chunk(b"zTXt", b"workflow\0\x00" + compressed)))
    assert read_graph_file(path, reg) == HAND_WRITTEN_API


def test_png_written_by_pillow(tmp_path, registry):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("prompt", json.dumps(API))
    info.add_itxt("note", "ünïcode", zip=True)
    path = tmp_path / "pillow.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    assert png_text_chunks(path.read_bytes()) == {"prompt": json.dumps(API), "note": "ünïcode"}
    assert read_graph_file(path, registry) == API


def test_png_without_a_graph(tmp_path, registry):
    path = tmp_path / "plain.png"
    path.write_bytes(_png())
    with pytest.raises(GraphFormatError, match="without a 'prompt' or 'workflow' text chunk"):
        read_graph_file(path, registry)


def test_json_files(tmp_path, reg):
    api_file = tmp_path / "api.json"
    api_file.write_text("\ufeff" + json.dumps(API))  # a byte-order mark is fine
    assert read_graph_file(api_file, reg) == API
    workflow_file = tmp_path / "workflow.json"
    workflow_file.write_text(json.dumps(HAND_WRITTEN))
    assert read_graph_file(workflow_file, reg) == HAND_WRITTEN_API
    broken = tmp_path / "broken.json"
    broken.write_text('{"1": {"class_type": "Const",\n "inputs": }}')
    with pytest.raises(GraphFormatError, match=r"broken.json: not valid JSON \(Expecting value at line 2 column 12\)"):
        read_graph_file(broken, reg)
    with pytest.raises(GraphFormatError, match="cannot read graph file .*missing.json"):
        read_graph_file(tmp_path / "missing.json", reg)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GraphFormatError, match="neither a PNG nor UTF-8 JSON"):
        read_graph_file(tmp_path / "binary.json", reg)


def test_to_api_accepts_a_request_body_and_refuses_non_objects(registry):
    assert to_api({"prompt": API, "client_id": "x"}, registry) == API
    assert to_api(API, registry) == API
    with pytest.raises(GraphFormatError, match="got list"):
        to_api([API], registry)


def test_overrides():
    api = {"3": {"class_type": "KSampler", "inputs": {"seed": 1, "text": "a"}}}
    before = copy.deepcopy(api)
    changed = apply_overrides(api, ["3.seed=42", "3.text=hello world", "3.cfg=7.5", "3.flag=false",
                                    '3.items=["a", "b"]'])
    assert changed["3"]["inputs"] == {"seed": 42, "text": "hello world", "cfg": 7.5, "flag": False,
                                      "items": ["a", "b"]}
    assert api == before
    with pytest.raises(GraphFormatError, match="write it as NODE_ID.INPUT=VALUE"):
        apply_overrides(api, ["3seed=1"])
    with pytest.raises(GraphFormatError, match="there is no node '4' in the graph"):
        apply_overrides(api, ["4.seed=1"])
