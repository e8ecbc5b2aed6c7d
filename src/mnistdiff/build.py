"""Build the objects a run needs from its config: data tensors, DataSpec, Denoiser."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .config import Config, DataConfig
from .data import DataSpec, load_dataset
from .models import build_backbone
from .parameterization import Denoiser
from .schedules import build_schedule
from .seeding import train_val_split
from .transforms import pad_to, to_model_range


@dataclass(frozen=True)
class TrainData:
    """Training and validation images in model range ``[N, 1, S, S]`` with their labels."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    spec: DataSpec


def prepare_images(images_uint8: Tensor, cfg: DataConfig) -> Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, S, S]`` in [-1, 1] (padded to 32 if asked)."""
    x = to_model_range(images_uint8)
    return pad_to(x, 32) if cfg.pad_to_32 else x


def data_spec(cfg: DataConfig, base: DataSpec) -> DataSpec:
    """The DataSpec the model sees (size 32 when padding)."""
    size = 32 if cfg.pad_to_32 else base.size
    return DataSpec(channels=base.channels, size=size, num_classes=base.num_classes)


def load_train_data(cfg: Config) -> TrainData:
    """Load the dataset and make the deterministic train/validation split."""
    arrays = load_dataset(cfg.data.dataset, cfg.data.data_dir, download=cfg.data.download)
    train_idx, val_idx = train_val_split(
        len(arrays.train_labels), cfg.data.val_size, seed=cfg.train.seed
    )
    images, labels = arrays.train_images, arrays.train_labels
    return TrainData(
        train_x=prepare_images(images[train_idx], cfg.data),
        train_y=labels[train_idx],
        val_x=prepare_images(images[val_idx], cfg.data),
        val_y=labels[val_idx],
        spec=data_spec(cfg.data, arrays.spec),
    )


def build_denoiser(cfg: Config, spec: DataSpec) -> Denoiser:
    """Backbone + schedule + parameterization, as the config describes."""
    backbone = build_backbone(cfg.model, spec)
    schedule = build_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    shape = (spec.channels, spec.size, spec.size)
    return Denoiser(backbone, schedule, cfg.diffusion.prediction, spec.num_classes, shape)
