"""Distillation as an objective of the shared training loop (``train(cfg, task=...)``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..build import build_denoiser
from ..config import Config, to_dict
from ..data import DataSpec
from ..parameterization import Denoiser
from ..train import Batch, TrainTask
from .batch import Batch as DistillBatch
from .methods import step_loss
from .student import load_teacher_weights
from .teacher import frozen_copy


class DistillTask(TrainTask):
    """Minimize ``cfg.distill.method``'s loss against a frozen teacher.

    :meth:`prepare` starts the student from the teacher's weights; :meth:`loss` hands the
    loop's images, labels (null where the loop dropped them) and the step's generator to the
    method's loss; the teacher's weights and config are part of the task's checkpoint state,
    so a resumed run never rereads the teacher's run directory.

    Args:
        cfg: the student's config.
        teacher_cfg: the teacher's config.
        spec: the data spec both models were built for.
        teacher_weights: the teacher's backbone weights (EMA when it had EMA).
        device: where the teacher runs.
    """

    name = "distill"

    def __init__(
        self,
        cfg: Config,
        teacher_cfg: Config,
        spec: DataSpec,
        teacher_weights: dict,
        device: torch.device | str,
    ) -> None:
        self.teacher_cfg = teacher_cfg
        teacher = build_denoiser(teacher_cfg, spec)
        teacher.backbone.load_state_dict(teacher_weights)
        self.teacher: Denoiser = frozen_copy(teacher.to(device))
        self.loss_fn = step_loss(cfg)

    def prepare(self, model: Denoiser) -> None:
        """Start the student as the teacher (a new guidance embedding starts at zero)."""
        load_teacher_weights(model.backbone, self.teacher.backbone.state_dict())

    def loss(self, model: Denoiser, batch: Batch) -> Tensor:
        """Per-example distillation loss ``[B]`` (randomness from ``batch.generator``)."""
        if batch.generator is None:
            raise ValueError("distillation draws from the step's generator: batch.generator")
        return self.loss_fn(
            model, self.teacher, DistillBatch(batch.x0, batch.labels), batch.generator
        )

    def state_dict(self) -> dict:
        return {
            "teacher": self.teacher.backbone.state_dict(),
            "teacher_config": to_dict(self.teacher_cfg),
        }

    def resume_command(self, run_dir: Path) -> str:
        """The teacher travels in the checkpoint, so the run directory is all it needs."""
        return f"mnistdiff distill --run-dir {run_dir} --resume auto"

    def load_state_dict(self, state: dict) -> None:
        self.teacher.backbone.load_state_dict(state["teacher"])
