"""Uploads and /view: naming rules, atomic writes, image checks, mask uploads, view variants."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from PIL import Image
from serverkit import Api, bomb_png, png, run, upload

from service.uploads import PREVIEW_MAX_SIDE, view_variant

ROOT = Path(__file__).resolve().parents[2]


def test_upload_names_reuse_and_overwrite(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            red, blue = png((255, 0, 0, 255)), png((0, 0, 255, 255))
            assert await upload(api, red, "pic.png") == (200, {"name": "pic.png", "subfolder": "", "type": "input"})
            assert (await upload(api, red, "pic.png"))[1]["name"] == "pic.png"  # identical content: reused
            assert (await upload(api, blue, "pic.png"))[1]["name"] == "pic (1).png"
            assert (await upload(api, blue, "pic.png"))[1]["name"] == "pic (1).png"
            assert (await upload(api, png((0, 255, 0, 255)), "pic.png"))[1]["name"] == "pic (2).png"
            status, answer = await upload(api, blue, "pic.png", overwrite="true")
            assert answer["name"] == "pic.png"
            assert (shared.base / "input" / "pic.png").read_bytes() == blue
            status, answer = await upload(api, red, "sub.png", subfolder="a/b", type="temp")
            assert answer == {"name": "sub.png", "subfolder": "a/b", "type": "temp"}
            status, body = await api.get("/view?filename=sub.png&subfolder=a/b&type=temp")
            assert status == 200 and body == red
            assert not [p for p in (shared.base / "input").rglob("*.part")]
    run(scenario())


def test_upload_checks(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            status, body = await upload(api, b"not an image at all", "fake.png")
            assert status == 400 and body["error"]["type"] == "invalid_image"
            status, body = await upload(api, bomb_png(100000, 100000), "bomb.png")
            assert status == 400 and body["error"]["type"] == "image_too_large"
            status, body = await upload(api, bomb_png(3000, 3000), "medium.png")  # over the 4 MP test budget
            assert status == 400 and body["error"]["type"] == "image_too_large"
            big = png(size=(900, 900), mode="RGB", color=(1, 2, 3))
            buffer = io.BytesIO()
            Image.new("RGB", (700, 700)).save(buffer, format="BMP")  # 1.4 MB uncompressed, over the 1 MB limit
            status, body = await upload(api, buffer.getvalue(), "huge.bmp")
            assert status == 413 and body["error"]["type"] == "upload_too_large"
            assert (await upload(api, big, "fine.png"))[0] == 200
            status, body = await upload(api, png(), "script.html")
            assert status == 400 and body["error"]["type"] == "invalid_filename"
            status, body = await upload(api, png(), "x.png", type="output")
            assert status == 400 and body["error"]["type"] == "invalid_type"
            form = aiohttp.FormData(default_to_multipart=True)
            form.add_field("other", "x")
            status, body = await api.post("/upload/image", data=form)
            assert status == 400 and "'image'" in body["error"]["message"]
            status, body = await api.post("/upload/image", {"image": "x"})
            assert status == 415
            for name in ("fake.png", "bomb.png", "medium.png", "huge.bmp", "script.html"):
                assert not (shared.base / "input" / name).exists()
    run(scenario())


def test_mask_upload_applies_alpha(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            original = png((10, 20, 30, 255), size=(6, 6), workflow='{"nodes": []}')
            assert (await upload(api, original, "paint.png"))[0] == 200
            mask = png((0, 0, 0, 0), size=(6, 6))
            ref = '{"filename": "paint.png", "subfolder": "", "type": "input"}'
            status, answer = await upload(api, mask, "paint.png", route="/upload/mask", original_ref=ref)
            assert status == 200 and answer["name"] == "paint (1).png"
            status, body = await api.get(f"/view?filename={answer['name']}&type=input")
            result = Image.open(io.BytesIO(body))
            assert result.getpixel((0, 0)) == (10, 20, 30, 0) and result.text["workflow"] == '{"nodes": []}'
            status, body = await upload(api, png(size=(3, 3)), "m.png", route="/upload/mask", original_ref=ref)
            assert status == 400 and "must match" in body["error"]["message"]
            missing = '{"filename": "nope.png", "type": "input"}'
            assert (await upload(api, mask, "m.png", route="/upload/mask", original_ref=missing))[0] == 404
            assert (await upload(api, mask, "m.png", route="/upload/mask"))[0] == 400
    run(scenario())


def test_view_variants_and_headers(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            await upload(api, png((200, 100, 50, 128), size=(5, 5)), "view.png")
            async with session.get(f"{shared.url}/view?filename=view.png&type=input") as response:
                assert response.status == 200 and response.headers["Content-Type"] == "image/png"
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert "sandbox" in response.headers["Content-Security-Policy"]
            status, body = await api.get("/view?filename=view.png&type=input&channel=rgb")
            assert Image.open(io.BytesIO(body)).mode == "RGB"
            status, body = await api.get("/view?filename=view.png&type=input&channel=a")
            assert Image.open(io.BytesIO(body)).getpixel((0, 0)) == (0, 0, 0, 128)
            async with session.get(f"{shared.url}/view?filename=view.png&type=input&preview=jpeg;50") as response:
                assert response.headers["Content-Type"] == "image/jpeg"
                assert Image.open(io.BytesIO(await response.read())).format == "JPEG"
            assert (await api.get("/view?filename=view.png [input]"))[0] == 200
            assert (await api.get("/view?filename=view.png&type=input&channel=xyz"))[0] == 400
            assert (await api.get("/view?filename=absent.png"))[0] == 404
            assert (await api.get("/view"))[0] == 400
            (shared.base / "output" / "page.html").write_text("<script>alert(1)</script>")
            async with session.get(f"{shared.url}/view?filename=page.html") as response:
                assert response.headers["Content-Type"] == "application/octet-stream"
                assert response.headers["Content-Disposition"].startswith("attachment")
    run(scenario())


async def _raw_upload(api: Api, filename: bytes, data: bytes) -> tuple[int, object]:
    """An upload whose Content-Disposition carries `filename` as raw bytes (possibly not UTF-8)."""
    boundary = "----sdgraphraw"
    body = (f"--{boundary}\r\n".encode() + b'Content-Disposition: form-data; name="image"; filename="' + filename +
            b'"\r\nContent-Type: image/png\r\n\r\n' + data + f"\r\n--{boundary}--\r\n".encode())
    return await api.post("/upload/image", data=body,
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def test_upload_name_that_is_not_utf8_is_a_clear_400(shared):
    """Issue #11, leftovers: a file name of invalid UTF-8 bytes gave 500; now 400 naming the problem."""
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            status, body = await _raw_upload(api, b"bad\xff\xfe.png", png())
            assert status == 400, body
            assert body["error"]["type"] == "invalid_filename" and "UTF-8" in body["error"]["message"]
            assert (await _raw_upload(api, "caf\u00e9.png".encode(), png()))[0] == 200
    run(scenario())


@pytest.mark.parametrize("fmt, size", [("PNG", (3000, 1000)), ("JPEG", (1000, 5000))])
def test_previews_are_scaled_to_fit(tmp_path, fmt, size):
    """Issue #11, leftovers: /view?preview= decoded and encoded images at full size; now at most
    PREVIEW_MAX_SIDE a side (JPEGs decoded at reduced size already)."""
    path = tmp_path / f"big.{fmt.lower()}"
    Image.new("RGBA" if fmt == "PNG" else "RGB", size, (10, 200, 30, 255)[:4 if fmt == "PNG" else 3]).save(path, fmt)
    data, kind = view_variant(path, channel=None, preview="webp;80", max_pixels=1 << 26)
    shown = Image.open(io.BytesIO(data))
    assert kind == "image/webp" and max(shown.size) <= PREVIEW_MAX_SIDE
    assert abs(shown.size[0] / shown.size[1] - size[0] / size[1]) < 0.01
    assert max(abs(a - b) for a, b in zip(shown.convert("RGB").getpixel((5, 5)), (10, 200, 30), strict=True)) <= 4
    data, _ = view_variant(path, channel="rgb", preview=None, max_pixels=1 << 26)
    assert Image.open(io.BytesIO(data)).size == size  # full-size variants stay full size


@pytest.mark.slow
def test_preview_of_an_8000_square_png_stays_within_its_decode(tmp_path):
    """Issue #11, leftovers: a webp preview of an 8000x8000 PNG peaked at 0.6-1.1 GB (full-size encode, a
    premultiplied copy, the file read whole); now the full-size decode (256 MB) plus a little."""
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        import numpy as np
        from PIL import Image
        from service.uploads import view_variant

        def kb(field):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

        ramp = np.linspace(0, 255, 8000, dtype=np.float32).astype(np.uint8)
        pixels = np.empty((8000, 8000, 4), np.uint8)
        pixels[..., 0], pixels[..., 1], pixels[..., 2], pixels[..., 3] = ramp[None, :], ramp[:, None], 7, 200
        Image.fromarray(pixels, "RGBA").save(sys.argv[1])
        del pixels
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the RSS high-water mark (VmHWM) to the current RSS
        before = kb("VmHWM:")
        data, kind = view_variant(Path(sys.argv[1]), channel=None, preview="webp;90", max_pixels=8192 * 8192)
        print(json.dumps([(kb("VmHWM:") - before) / 1024, kind]))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.png")], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, check=True)
    grown, kind = json.loads(done.stdout.strip().splitlines()[-1])
    assert kind == "image/webp"
    assert grown < 380, f"the preview grew the process by {grown:.0f} MB"


def test_the_server_removes_leftover_temporary_files_when_it_starts(fresh, tmp_path):
    """Issue #11, leftovers: `.part` files of uploads or saves a crash interrupted survived restarts."""
    import os
    import time

    base = tmp_path / "base"  # the folder `fresh` serves (serverkit.make_base)
    leftovers = [base / "input" / ".pic.png.abcd1234.part", base / "output" / "sub" / ".img_00001_.png.zz_9ab12.part"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - 10, time.time() - 10))
    kept = base / "output" / "notes.part"
    kept.write_bytes(b"not ours")
    fresh()
    assert not any(path.exists() for path in leftovers) and kept.exists()
