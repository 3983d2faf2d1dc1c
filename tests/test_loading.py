"""Loading paths: local folders (from_pretrained), kwargs pass-through, multi-device maps, remote simulation."""

from __future__ import annotations

import os

import pytest
import torch

from expertlens import ExpertModel
from expertlens.testing import tiny_model, tiny_tokenizer

from .conftest import make_ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = tiny_model("qwen2_moe")
    path = tmp_path_factory.mktemp("qwen2_moe")
    hf.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    ids = make_ids()
    from transformers import AutoModelForCausalLM

    # The reference is the same folder loaded by plain transformers: a reloaded model's memory
    # layout can move grouped GEMM results in the last bit relative to the in-memory original.
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(path)(ids).logits
    return path, ids, reference


def test_from_local_folder_offline(saved):
    path, ids, reference = saved
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = ExpertModel(str(path))
    assert model.family == "qwen2_moe" and model.tokenizer is not None
    with torch.no_grad(), model.trace(ids):
        out = model.logits.save()
    assert torch.equal(out, reference)


def test_loading_kwargs_pass_through_and_remote_code_stays_off(saved, monkeypatch):
    from transformers import AutoModelForCausalLM

    path, ids, _ = saved
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return original(name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model = ExpertModel(str(path), dtype=torch.bfloat16)
    assert seen["trust_remote_code"] is False and seen["dtype"] is torch.bfloat16
    assert model.dtype == torch.bfloat16
    with torch.no_grad(), model.trace(ids):
        eo = model.layers[0].moe.expert_out.save()
    assert eo.dtype == torch.bfloat16


def test_a_folder_with_custom_code_is_refused_without_running_it(tmp_path):
    import json

    from expertlens.testing import tiny_config

    folder, sentinel = tmp_path / "custom", tmp_path / "imported"
    folder.mkdir()
    cfg = {**tiny_config("olmoe").to_dict(), "model_type": "my_custom_moe",
           "auto_map": {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "custom.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match=r"needs its own Python code .* never runs remote code"):
        ExpertModel(str(folder))
    assert not sentinel.exists()


def _device_map(**placed: str) -> dict[str, str]:
    """The tiny qwen2_moe's top-level modules on the CPU, except those ``placed`` elsewhere (in module order)."""
    names = ("model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head")
    return {name: placed.get(name, "cpu") for name in names}


def test_layers_on_different_devices_still_resolve(saved, tmp_path):
    """A device map that puts layer 1 on 'disk' (accelerate offload, weights moved in at forward)."""
    path, ids, reference = saved
    device_map = _device_map(**{"model.layers.1": "disk"})
    model = ExpertModel(str(path), device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert hasattr(model.hf_model.model.layers[1], "_hf_hook")  # accelerate really dispatched it
    with torch.no_grad(), model.trace(ids):
        logits = model.layers[1].moe.router_logits.save()
        w = model.layers[1].moe.topk_weights.save()
        eo = model.layers[1].moe.expert_out.save()
        shared = model.layers[1].moe.shared_out.save()
        out_moe = model.layers[1].moe.output.save()
        out = model.logits.save()
    assert logits.shape == (2, 7, 8)
    torch.testing.assert_close((eo * w.unsqueeze(-1)).sum(-2) + shared, out_moe, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_embedding_offloaded_to_disk_wraps_with_exact_points_and_edits(saved, tmp_path):
    """``device_map`` with the embedding (the map's first entry) on 'disk': transformers' pipeline, which nnsight
    builds on wrap, takes its device from that entry; expertlens hands it the embedding's execution device.
    Every read point and an edit equal those of the resident model, and the map is left as loaded."""
    from expertlens.interventions import AddVector

    path, ids, reference = saved
    device_map = _device_map(**{"model.embed_tokens": "disk", "model.layers.0": "disk"})
    model = ExpertModel(str(path), device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert model.hf_model.get_input_embeddings().weight.is_meta  # really offloaded
    assert model.hf_model.hf_device_map == device_map  # the order nnsight's pipeline saw is not left behind
    assert model.device == torch.device("cpu")
    resident = ExpertModel(str(path))

    def read(m: ExpertModel):
        steer = AddVector("resid_pre", torch.linspace(-1, 1, m.d_model), layers=1)
        with torch.no_grad(), m.trace(ids):
            a, b = m.layers[0].moe.router_logits.save(), m.layers[0].moe.expert_out.save()
            c, d, e = m.layers[1].moe.router_logits.save(), m.layers[1].moe.output.save(), m.logits.save()
        with torch.no_grad(), m.intervene(steer), m.trace(ids):
            steered = m.logits.save()
        return [a, b, c, d, e, steered]

    offloaded, plain = read(model), read(resident)
    assert torch.equal(offloaded[-2], reference)
    for got, want in zip(offloaded, plain):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.equal(offloaded[-1], offloaded[-2])  # the edit reached the offloaded model


def test_kwargs_for_a_built_model_are_an_error():
    with pytest.raises(TypeError, match="only apply when `model` is a name or path"):
        ExpertModel(tiny_model("olmoe"), tiny_tokenizer(), dtype=torch.bfloat16)


def test_points_work_through_nnsight_remote_simulation():
    """nnsight's remote="local" serialises the trace as for NDIF and runs it with user modules hidden."""
    model = ExpertModel(tiny_model("qwen2_moe"), tiny_tokenizer())
    ids = make_ids(1, 7)
    with torch.no_grad(), model.trace(ids):
        reference = model.logits.save()
    with torch.no_grad(), model.trace(ids, remote="local"):
        resid = model.layers[0].resid_post.save()
        logits = model.layers[1].moe.router_logits.save()
        out = model.logits.save()
    assert resid.shape == (1, 7, 64) and logits.shape == (1, 7, 8)
    assert torch.equal(out, reference)
