"""Training, evaluation, tracking and cluster sections of the job config (pure dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12  # 1x schedule (CO_DETR_SPEC 5.1)
    max_steps: int = 0  # > 0: stop after exactly this many optimizer steps (overrides epochs for the end)
    total_batch_size: int = 16  # images per optimizer step over all workers; reached by gradient accumulation
    lr: float = 2e-4  # AdamW learning rate (Co-DINO R50)
    weight_decay: float = 1e-4  # on every parameter, norms and embeddings included (mmcv default constructor)
    lr_mults: dict[str, float] = field(default_factory=lambda: {"backbone": 0.1})  # name substring -> lr factor
    # > 0: layer-wise lr decay of the authors' ViT (0.8 in their ViT-L recipes): block i of N at decay ** (N - i),
    # embeddings at decay ** (N + 1), the rest at 1; multiplies lr_mults (set lr_mults: {} as the authors)
    layer_decay: float = 0.0
    clip_grad_norm: float = 0.1  # L2 max norm; 0 disables
    lr_steps: tuple[int, ...] = (11,)  # epochs after which lr *= lr_gamma (step schedule, no warmup for R50)
    lr_step_unit: Literal["epoch", "step"] = "epoch"  # unit of lr_steps
    lr_gamma: float = 0.1
    warmup_steps: int = 0  # linear warmup iterations (ViT-L recipe: 500)
    warmup_ratio: float = 0.001  # warmup starts at lr * warmup_ratio
    amp: Literal["auto", "bf16", "none"] = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    ema: bool = False  # keep an exponential moving average of the weights (ViT-L / O365->COCO recipes)
    ema_decay: float = 0.9999  # EMA decay per optimizer step (mmdet ExpMomentumEMA momentum 1e-4)
    nonfinite: Literal["raise", "skip"] = "raise"  # non-finite loss: stop with per-term losses, or skip the step
    checkpoint_every_steps: int = 0  # > 0: checkpoint every N optimizer steps (plus every epoch end)
    keep_checkpoints: int = 2  # checkpoints kept in the run's storage (Ray CheckpointConfig.num_to_keep)
    # "async": rank 0 writes the checkpoint locally and hands it to Ray's background upload (ray.train.report
    # checkpoint_upload_mode=ASYNC), so no rank waits in the next collective for a multi-GB upload; Ray registers
    # it (and resume can see it) only once the upload is complete. "sync": report returns after the upload.
    checkpoint_upload: Literal["sync", "async"] = "sync"
    checkpoint_local_dir: str = ""  # where rank 0 writes a checkpoint first: "" = the system temp dir; "/dev/shm"
    log_every_steps: int = 10  # report metrics every N optimizer steps
    seed: int = 0  # run seed: torch/numpy/augmentation seeds derive from (seed, epoch, rank)


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: int = 1  # evaluate on the val split every N epochs (and always at the end of a stage)
    protocol: Literal["coco", "lvis"] = "coco"  # box AP rules
    max_dets: int = 100  # detections per image scored by COCO AP (LVIS: 300)
    max_images: int = 0  # > 0: evaluate on at most this many val images (demos, tests)
    batch_size: int = 2  # images per worker per eval batch


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1  # Ray Train workers (one per GPU on a cluster)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts from the last checkpoint (Ray FailureConfig)
    # > 0: elastic, ScalingConfig(num_workers=(min_workers, num_workers)): after a node loss the run restarts from
    # its last checkpoint on the workers that fit (>= min_workers); accumulation keeps train.total_batch_size
    min_workers: int = 0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra (custom) Ray resources per worker


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI or sqlite:///<work_dir>/mlflow.db
    experiment: str = ""  # "" = codetr-<stage kind>, e.g. codetr-pretrain
    register_as: str = ""  # registered model name; "" = codetr-<dataset>
    enabled: bool = True


@dataclass(frozen=True)
class InitConfig:
    # Where the weights of this stage start from: "" (backbone init only), a checkpoint URI (dir or model.pt),
    # an MLflow run ("runs:/<id>/model") or a registered model ("models:/codetr-o365@latest").
    # When the label space differs, class-dependent parameters are remapped by category name.
    from_: str = field(default="", metadata={"key": "from"})
