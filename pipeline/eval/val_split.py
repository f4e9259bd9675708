"""Ray Train's data config with a lossless split for evaluation datasets (driver side; Ray at the edge).

    TorchTrainer(..., datasets={"train": train_ds, "val": val_ds}, dataset_config=lossless_val_config())

Ray Train's default `DataConfig` splits every dataset with `streaming_split(world, equal=True)`, which drops
rows so that all workers see the same count: with 8 workers up to 7 val images were never evaluated. Here the
datasets named in `unequal` (default: "val") are split with `equal=False` (Ray Data: "no data is dropped";
workers may get a few rows more or fewer, which evaluation does not mind: its only collective is the gather
after the last batch). Training datasets keep the equal split that DDP's lockstep needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray.train


class LosslessValDataConfig(ray.train.DataConfig):
    """`ray.train.DataConfig` whose `configure` (the documented subclassing hook) splits the `unequal`
    datasets without dropping rows and delegates every other dataset to Ray's default."""

    def __init__(self, unequal: Sequence[str] = ("val",)) -> None:
        super().__init__()
        self.unequal = frozenset(unequal)

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        rest = {k: v for k, v in datasets.items() if k not in self.unequal}
        out = (super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs) if rest
               else [{} for _ in range(world_size)])
        for name, ds in datasets.items():
            if name not in self.unequal:
                continue
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self.default_ingest_options()
            for i, it in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                out[i][name] = it
        return out


def lossless_val_config(unequal: Sequence[str] = ("val",)) -> LosslessValDataConfig:
    return LosslessValDataConfig(unequal)
