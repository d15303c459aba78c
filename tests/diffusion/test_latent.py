import dataclasses

import pytest
import torch

from diffusion.latent import CondEntry, Conditioning, Latent


def test_latent_reads_like_comfyui_dict():
    samples, mask = torch.zeros(2, 4, 8, 8), torch.ones(1, 1, 64, 64)
    lat = Latent(samples, noise_mask=mask, batch_index=(3, 5))
    assert lat["samples"] is samples and lat.get("noise_mask") is mask
    assert lat["batch_index"] == [3, 5]
    assert "samples" in lat and "noise_mask" in lat and "other" not in lat
    assert set(lat) == {"samples", "noise_mask", "batch_index"} and len(lat) == 3
    d = lat.copy()
    assert type(d) is dict and d["samples"] is samples and d["batch_index"] == [3, 5]
    d["batch_index"].append(9)
    assert lat.batch_index == (3, 5), "copies do not leak back"


def test_latent_optional_keys_absent():
    lat = Latent(torch.zeros(1, 4, 2, 2))
    assert list(lat) == ["samples"] and lat.get("noise_mask") is None
    with pytest.raises(KeyError):
        lat["batch_index"]


def test_latent_is_frozen():
    lat = Latent(torch.zeros(1, 4, 2, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        lat.samples = torch.ones(1)
    with pytest.raises(TypeError):
        lat["samples"] = torch.ones(1)


def test_latent_from_value():
    samples = torch.zeros(2, 4, 2, 2)
    lat = Latent.from_value({"samples": samples, "batch_index": [0, 1], "downscale_ratio_spacial": 8})
    assert lat.samples is samples and lat.batch_index == (0, 1) and lat.noise_mask is None
    assert Latent.from_value(lat) is lat
    with pytest.raises(TypeError):
        Latent.from_value({"noise_mask": torch.ones(1)})


@pytest.mark.parametrize("bad", [
    dict(samples=torch.zeros(4, 2, 2)),
    dict(samples=torch.zeros(2, 4, 2, 2), batch_index=(1,)),
    dict(samples=torch.zeros(1, 4, 2, 2), batch_index=(-1,)),
    dict(samples=torch.zeros(1, 4, 2, 2), noise_mask=[[1.0]]),
])
def test_latent_validates(bad):
    with pytest.raises(ValueError):
        Latent(**bad)


def test_replace_keeps_other_fields():
    mask = torch.ones(1, 1, 2, 2)
    lat = Latent(torch.zeros(1, 4, 2, 2), noise_mask=mask, batch_index=(4,))
    new = lat.replace(samples=torch.ones(1, 4, 2, 2))
    assert new.noise_mask is mask and new.batch_index == (4,) and new.samples.eq(1).all()


def test_conditioning_roundtrip_and_combine():
    c1, p1, c2 = torch.zeros(1, 77, 8), torch.zeros(1, 8), torch.ones(1, 154, 8)
    comfy = [[c1, {"pooled_output": p1}], [c2, {"pooled_output": None, "strength": 0.5}]]
    cond = Conditioning.from_value(comfy)
    assert len(cond) == 2 and cond.entries[0].pooled is p1 and cond.entries[1].strength == 0.5
    back = cond.to_comfy()
    assert back[0][0] is c1 and back[0][1] == {"pooled_output": p1}
    assert back[1][1]["strength"] == 0.5
    both = Conditioning((CondEntry(c1),)).combine(comfy)
    assert [e.context for e in both.entries] == [c1, c1, c2]
    assert Conditioning.from_value(cond) is cond
    assert Conditioning.from_value([CondEntry(c2)]).entries[0].context is c2


def test_conditioning_refuses_what_it_cannot_sample():
    with pytest.raises(ValueError, match="gligen"):
        Conditioning.from_value([[torch.zeros(1, 77, 8), {"gligen": ("position", None, [])}]])
    with pytest.raises(TypeError):
        Conditioning.from_value([torch.zeros(1, 77, 8)])
    with pytest.raises(ValueError):
        CondEntry(torch.zeros(77, 8))


def test_cond_entry_defaults_keep_plain_text_conditioning():
    e = CondEntry(torch.zeros(1, 77, 8))
    assert (e.area, e.mask, e.mask_strength, e.set_area_to_bounds) == (None, None, 1.0, False)
    assert (e.start_percent, e.end_percent, e.control, e.concat_latent_image, e.concat_mask) == (0.0, 1.0, None,
                                                                                                None, None)


def test_comfy_cond_keys_round_trip():
    """Issue #12: area, mask, timestep range, control and inpaint keys read from and written to ComfyUI's dict."""
    context, mask, image, control = torch.zeros(1, 77, 8), torch.ones(1, 4, 4), torch.ones(1, 4, 2, 2), object()
    extra = {"pooled_output": None, "area": (8, 4, 2, 0), "mask": mask, "mask_strength": 0.5,
             "set_area_to_bounds": True, "start_percent": 0.25, "end_percent": 0.75, "control": control,
             "control_apply_to_uncond": True,
             "concat_latent_image": image, "concat_mask": mask, "strength": 2.0}
    entry = Conditioning.from_value([[context, extra]]).entries[0]
    assert entry.area == (8, 4, 2, 0) and entry.mask is mask and entry.mask_strength == 0.5
    assert entry.set_area_to_bounds and (entry.start_percent, entry.end_percent) == (0.25, 0.75)
    assert entry.control is control and entry.concat_latent_image is image and entry.concat_mask is mask
    assert entry.strength == 2.0
    assert Conditioning((entry,)).to_comfy() == [[context, extra]]
    percentage = Conditioning.from_value([[context, {"area": ("percentage", 0.5, 1.0, 0.0, 0.5)}]])
    assert percentage.entries[0].area == ("percentage", 0.5, 1.0, 0.0, 0.5)
    assert percentage.to_comfy()[0][1]["area"] == ("percentage", 0.5, 1.0, 0.0, 0.5)


@pytest.mark.parametrize("area", [(8, 8, 0), ("percent", 1, 1, 0, 0), (8.5, 8, 0, 0), "8,8,0,0"])
def test_bad_areas_are_refused(area):
    with pytest.raises(ValueError, match="area"):
        CondEntry(torch.zeros(1, 77, 8), area=area)
