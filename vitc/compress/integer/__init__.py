"""Integer-only ViT inference (issue 8): no float op between the input quantizer and the logits.

    from vitc.compress import integer
    int_backbone = integer.apply(backbone, integer.IntegerConfig(), data=calibration_source)
    int_backbone(x)                                   # float logits, computed in integers
    int_backbone.module.integer_logits(x)             # the int32 logit accumulator

Pieces: ``kernels`` (Shiftmax, ShiftGELU, lambda-ShiftGELU, integer LayerNorm, isqrt,
dyadic requantization, aligned residual add, BN-folded integer conv, hardswish, SiLU),
``reference`` (the float model with calibration taps), ``hf_vit`` (reads a ViT Backbone),
``convert`` (calibrate, build), ``program`` (the integer model and its reference executor),
``vitc.export.integer_onnx`` (the bit-exact ONNX graph).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vitc.errors import VitcError


@dataclass
class IntegerConfig:
    weight_bits: int = 8
    act_bits: int = 8
    residual_bits: int = 16  # the residual stream never enters a matmul; 16 bits keep it from clipping
    act_input_bits: int = 16  # the MLP activation's input only indexes its table (2**bits entries), never a matmul
    ln_reparam: bool = True  # RepQ-ViT: equalise the channels of LayerNorm outputs before calibration
    # attention probabilities' grid: at 257 tokens most probabilities are near 1/257, below one step
    # of a uint8 grid (on zoo:dinov2s-c10, 14 bits instead of 8 took the integer graph's agreement with
    # FP32 from 88.0% to 95.3%: benchmarks/results_integer_ablation_*); above 8 bits probs x V runs as
    # two uint8 MatMulIntegers (high and low digit), the same integers
    prob_bits: int = 14
    # minmax | percentile | mse | entropy (int8 taps; input, residual and a wide activation input: minmax).
    # min-max: a real ViT's rare large activations carry the prediction (zoo:dinov2s-c10's CLS token
    # reaches 13.7 after GELU where the patch tokens stay under 3.5); percentile clipping lost 12-17
    # points there, min-max none (benchmarks/results_integer_ablation_*)
    calibration: str = "minmax"
    percentile: float = 99.99
    calib_size: int = 256
    seed: int = 0
    # the MLP activation's table: "exact" (the model's own function, rounded offline), "lambda"
    # (lambda-ShiftGELU, slope fitted per layer) or "shift" (ShiftGELU, 1.702); all run as one Gather
    gelu: str = "exact"
    batch_size: int = 64
    recover_steps: int = 0  # > 0: fine-tune with the integer rounding simulated (distillation from FP32)
    recover_size: int = 1024  # images the recovery draws its batches from
    recover_lr: float = 1e-5  # Adam steps are full-size even on the tiny gradients of an already-close model

    def validate(self) -> None:
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits > 8 or bits < 2:
                flag = "--wbits" if name == "weight_bits" else "--abits"
                raise VitcError(f"--integer-only needs {flag} between 2 and 8, got {bits} (int8 MatMulInteger "
                                "operands)", f"pass {flag} 8 or lower")
        if not 8 <= self.prob_bits <= 14:
            raise VitcError(f"attention probability width {self.prob_bits} is outside 8..14 bits (the int32 "
                            "Shiftmax of the ONNX graph)", "use 14")
        if not 8 <= self.act_input_bits <= 16:
            raise VitcError(f"activation input width {self.act_input_bits} is outside 8..16 bits (its table has "
                            "2**bits entries)", "use 16")
        if not 8 <= self.residual_bits <= 24:
            raise VitcError(f"residual width {self.residual_bits} is outside 8..24 bits", "use 16")
        if self.gelu not in ("exact", "lambda", "shift"):
            raise VitcError(f"gelu approximation '{self.gelu}' is not known", "use exact, lambda or shift")
        from vitc.calibration.observers import CALIBRATORS

        if self.calibration not in CALIBRATORS:
            raise VitcError(f"calibrator '{self.calibration}' is not known", f"use one of: {', '.join(CALIBRATORS)}")
        if not 0 <= self.recover_steps <= 100000:
            raise VitcError(f"--recover-steps {self.recover_steps} is out of range", "pass 0 to 100000")
        if self.calib_size < 1:
            raise VitcError(f"calibration size {self.calib_size} is not positive", "pass 1 or more images")


def calibration_batches(backbone, data, config: IntegerConfig, size: int | None = None) -> list[torch.Tensor]:
    """Preprocessed calibration batches from an ImageSource (or a ready tensor)."""
    if data is None:
        raise VitcError("integer-only conversion needs calibration images", "pass --data (e.g. bundled:calib)")
    if isinstance(data, torch.Tensor):
        return list(data[:size or config.calib_size].split(config.batch_size))
    from vitc.calibration.data import iter_batches

    source = data.select(size or config.calib_size, config.seed)
    return [x for x, _ in iter_batches(source, backbone.preprocess, config.batch_size)]


def check_reference(backbone, float_vit, x: torch.Tensor, tol: float = 1e-3) -> None:
    """The float model the integer one is built from must compute what the backbone computes.

    A layer read in the wrong order (a stem that is not a plain conv-BN-ReLU chain) or an op
    the adapter did not see would otherwise turn into a silently wrong integer model.
    """
    with torch.no_grad():
        want = backbone(x.float())
        got = float_vit.forward(x.float())
    err = float((got - want).abs().max())
    if not err <= tol * max(1.0, float(want.abs().max())):
        raise VitcError(f"integer-only: the float reference read from {backbone.source} differs from the model by "
                        f"{err:.3g} in the logits (an op the integer ViT does not model)",
                        "quantize without --integer-only")


def apply(backbone, config: IntegerConfig | None = None, data=None, ranges: dict[str, float] | None = None,
          progress=None):
    """Convert a float ViT Backbone into an integer-only one.

    ``ranges`` (tap name -> absolute range) skips our calibration, e.g. to take the scales of
    the W8A8 pass (``scale * 127``); otherwise ``data`` (an ImageSource or a tensor of
    preprocessed images) is observed by ``config.calibration``. ``config.recover_steps > 0``
    fine-tunes the weights with the integer rounding simulated before the conversion.
    """
    from .convert import build, calibrate, equalize_norms
    from .hf_vit import read_vit
    from .program import IntegerViT

    config = config or IntegerConfig()
    config.validate()
    float_vit = read_vit(backbone)
    equalized: list[str] = []
    if ranges is None:
        batches = calibration_batches(backbone, data, config)
        check_reference(backbone, float_vit, batches[0][:16])
        if config.ln_reparam:
            float_vit, equalized = equalize_norms(float_vit, batches)
        ranges = calibrate(float_vit, batches, config.calibration, config.percentile, config.act_bits,
                           config.act_input_bits)
    # ranges given from outside were observed on the model as it is: its norms are not rewritten
    record = {"pass": "integer", "config": asdict(config), "calibrated_taps": len(ranges),
              "equalized_norms": len(equalized)}
    if config.recover_steps:
        from .recover import recover

        images = torch.cat(calibration_batches(backbone, data, config, config.recover_size))
        float_vit = recover(float_vit, ranges, images, config.recover_steps, config.weight_bits, config.act_bits,
                            config.residual_bits, config.gelu, config.recover_lr, seed=config.seed, progress=progress,
                            act_input_bits=config.act_input_bits, prob_bits=config.prob_bits)
        record["recovery_images"] = int(images.shape[0])
    program = build(float_vit, ranges, config.weight_bits, config.act_bits, config.residual_bits, config.gelu,
                    config.act_input_bits, config.prob_bits)
    return backbone.copy().with_module(IntegerViT(program), record)
