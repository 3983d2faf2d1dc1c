"""Real checkpoint formats: FP8 experts (exact points), MXFP4 kernels and bnb-quantised W_O (clear refusals).

No quantisation library or GPU is needed: the FP8 experts module is transformers' own ``FP8Experts`` holding
float weights (its ``linear`` then takes the plain ``F.linear`` path, the rest of the code path is the FP8 one),
the MXFP4 module is transformers' ``Mxfp4GptOssExperts``, and the bnb weight is a packed uint8 stand-in of
bitsandbytes' ``Params4bit`` layout.
"""

from __future__ import annotations

import nnsight
import pytest
import torch
from torch import nn

from expertlens import ExpertModel, PointError, UnsupportedModelError
from expertlens.testing import tiny_model, tiny_tokenizer

from .conftest import make_ids


def _with_fp8_experts(hf):
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    cls = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)
    for layer in hf.model.layers:
        old = layer.mlp.experts
        new = cls(hf.config, block_size=(32, 32))
        for name in ("gate_up_proj", "down_proj"):
            setattr(new, name, nn.Parameter(getattr(old, name).data.clone()))
        layer.mlp.experts = new
    return hf


def test_fp8_experts_get_the_expertlens_fp8_implementation_and_exact_points():
    ids = make_ids()
    hf = tiny_model("qwen3_moe")
    with torch.no_grad():
        reference = hf(ids).logits
    hf = _with_fp8_experts(hf)
    assert type(hf.model.layers[0].mlp.experts).__name__ == "FP8Experts"
    hf.set_experts_implementation("eager")  # the FP8 eager loop (FP8 grouped_mm needs the `kernels` package)
    with torch.no_grad():
        fp8_eager = hf(ids).logits
    model = ExpertModel(hf, tiny_tokenizer())  # validates: reconstruction + routing on every layer
    with torch.no_grad(), model.trace(ids):
        rows = nnsight.save([(m.topk_weights, m.expert_out, m.output) for m in (model.layers[i].moe for i in (0, 1))])
        logits = model.logits.save()
    torch.testing.assert_close(logits, fp8_eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    for w, eo, out in rows:
        torch.testing.assert_close((eo * w.unsqueeze(-1)).sum(-2), out, atol=1e-6, rtol=0)
    model.restore()
    assert hf.config._experts_implementation == "eager"


def test_mxfp4_kernel_experts_are_refused_with_the_dequantize_alternative():
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts

    hf = tiny_model("gpt_oss")
    for layer in hf.model.layers:
        layer.mlp.experts = Mxfp4GptOssExperts(hf.config)
    with pytest.raises(UnsupportedModelError, match=r"Mxfp4GptOssExperts.*Mxfp4Config\(dequantize=True\)"):
        ExpertModel(hf, tiny_tokenizer())
    assert not any(".el_" in n for n, _ in hf.named_modules())


class Linear4bit(nn.Linear):
    """Stand-in for ``bnb.nn.Linear4bit``: an nn.Linear whose weight is packed 4-bit codes ``[in*out/2, 1]``."""

    def __init__(self, dense: nn.Linear):
        super().__init__(dense.in_features, dense.out_features, bias=dense.bias is not None)
        self.dense = dense.weight.detach().clone()
        packed = torch.zeros(dense.in_features * dense.out_features // 2, 1, dtype=torch.uint8)
        self.weight = nn.Parameter(packed, requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.dense.to(x.dtype), self.bias)


def test_bnb_quantised_o_proj_keeps_moe_points_and_refuses_head_points_clearly():
    hf = tiny_model("olmoe")
    ids = make_ids()
    with torch.no_grad():
        reference = hf(ids).logits
    for layer in hf.model.layers:
        layer.self_attn.o_proj = Linear4bit(layer.self_attn.o_proj)
    model = ExpertModel(hf, tiny_tokenizer())
    with torch.no_grad(), model.trace(ids):
        z = model.layers[0].attn.z.save()
        out = model.layers[0].attn.output.save()
        eo = model.layers[1].moe.expert_out.save()
        logits = model.logits.save()
    assert torch.equal(logits, reference)
    assert z.shape[-2:] == (model.n_heads, model.d_head) and out.shape[-1] == eo.shape[-1] == model.d_model
    with pytest.raises(PointError, match=r"layer 0: the attention output projection is quantised \(Linear4bit.*"
                       r"llm_int8_skip_modules"):
        model.layers[0].attn.o_weight
    with pytest.raises(PointError, match="quantised"):
        with model.trace(ids):
            model.layers[0].attn.head_out.save()
    with pytest.raises(PointError, match="quantised"):
        model.add_edit("attn.head_out", lambda x, ctx: x, layer=0)
    assert model.n_edits() == 0
