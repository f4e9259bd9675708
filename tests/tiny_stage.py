"""Overrides of the tiny training stage shared by the Ray Train tests (fault, services, job submit).

8 train images of 64-96 px, 2 images per optimizer step (batch 1 x accumulation 2) = 4 steps per epoch, no
augmentation, evaluation only at the end on 2 images, one worker with one CPU.
"""

TINY_STAGE = [
    "synthetic.images=8", "synthetic.val_images=2", "synthetic.classes=3", "synthetic.image_size=[64,96]",
    "data.augment.policy=none", "data.batch_size=1", "data.num_workers=1", "data.map_batch_size=4",
    "train.total_batch_size=2", "train.log_every_steps=1", "train.epochs=10",
    "eval.every_epochs=100", "eval.max_images=2", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
]
