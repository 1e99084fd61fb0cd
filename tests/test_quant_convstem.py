"""BN folding pairs each BatchNorm with the conv registered before it, also inside a plain Sequential stem."""
from __future__ import annotations

import torch


def test_fold_batchnorms_in_sequential_conv_stem_preserves_outputs():
    import transformers as T

    from vitc.backbone import Backbone
    from vitc.compress.quantize.ptq import fold_batchnorms
    from vitc.models.convstem import ConvStem
    from vitc.models.preprocess import Preprocess
    from vitc.models.wrappers import LogitsModule

    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, num_labels=10)
    m = T.ViTForImageClassification(cfg)
    m.vit.embeddings.patch_embeddings.projection = ConvStem(3, [8, 16, 16], 32, 4)
    for bn in m.modules():  # non-trivial running statistics, as after training
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    module = LogitsModule(m.eval()).eval()
    b = Backbone(module, Preprocess(32, 32), [str(i) for i in range(10)], "test")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = module(x)
        folded = fold_batchnorms(module, b.structure)
        out = module(x)
    assert len(folded) == 3
    assert not any(isinstance(mm, torch.nn.BatchNorm2d) for mm in module.modules())
    assert torch.allclose(out, ref, atol=1e-4)
