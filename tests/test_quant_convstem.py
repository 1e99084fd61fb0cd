"""BN folding pairs each BatchNorm with the conv registered before it, also inside a plain Sequential stem."""
from __future__ import annotations

import torch


def test_fold_batchnorms_in_sequential_conv_stem_preserves_outputs(make_convstem_vit):
    from vitc.compress.quantize.ptq import fold_batchnorms

    b = make_convstem_vit(layers=1)
    module = b.module
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = module(x)
        folded = fold_batchnorms(module, b.structure)
        out = module(x)
    assert len(folded) == 3
    assert not any(isinstance(mm, torch.nn.BatchNorm2d) for mm in module.modules())
    assert torch.allclose(out, ref, atol=1e-4)
