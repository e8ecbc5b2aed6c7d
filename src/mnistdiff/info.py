"""``mnistdiff info``: parameter count and FLOPs of a config's or checkpoint's backbone."""

from __future__ import annotations

from .build import build_denoiser, data_spec
from .config import Config
from .data import DataSpec
from .models.flops import model_report


def model_info(cfg: Config | None = None, checkpoint: str | None = None) -> dict:
    """Report for ``cfg`` (architecture only; no data is read) or for a saved model."""
    if checkpoint is not None:
        from .sample import Pipeline

        pipe = Pipeline.load(checkpoint, device="cpu")
        cfg, spec, backbone = pipe.cfg, pipe.spec, pipe.denoiser.backbone
    else:
        spec = data_spec(cfg.data, DataSpec())
        backbone = build_denoiser(cfg, spec).backbone
    report = {
        "backbone": cfg.model.type,
        "image": f"{spec.channels}x{spec.size}x{spec.size}",
        "schedule": cfg.diffusion.schedule,
        "prediction": cfg.diffusion.prediction,
    }
    report.update(model_report(backbone, spec))
    return report
