"""Import an official Co-DINO checkpoint (the authors' .pth) as a checkpoint of this project.

    python jobs/import_checkpoint.py --src /data/co_dino_5scale_r50_1x_coco.pth \
        --config configs/model/co_dino_r50.yaml --out .codetr/imported/co_dino_r50_coco

    ray job submit --working-dir . -- python jobs/import_checkpoint.py \
        --src s3://bucket/official/co_dino_5scale_swin_large_1x_coco.pth \
        --config configs/model/co_dino_swin_l.yaml --set 'model.co.aux_heads=[]' --out s3://bucket/ckpt/swin_l_k0

Reads the .pth from any storage URI (a raw state dict or {"state_dict", "meta", ...}), drops EMA copies
(`ema_*`) and non-parameter buffers, maps the authors' names onto the model of `--config`
(pipeline/checkpoints/convert.py), checks names and shapes strictly and writes a checkpoint directory in the
training format (model.pt, config.yaml, trainer_state.json, categories.json) that jobs/evaluate.py
(`--model OUT`), finetuning (`--set init.from=OUT`) and the registry accept. With a K = 0 recipe
(`--set 'model.co.aux_heads=[]'`) the auxiliary heads of a K = 2 checkpoint are skipped and listed.
ViT-L (configs/model/co_dino_vit_l.yaml, co_dino_vit_l_lvis.yaml): the rotary tables are dropped (listed as
freqs_cos / freqs_sin buffers); the FedLoss `fed_loss_weight` buffers are kept when the recipe has
`model.loss.fed_loss` (LVIS), else dropped and listed.
The model config is saved with `backbone.pretrained=false` (the weights come from the checkpoint).

Categories: `--categories auto` (default) takes the names in the checkpoint's meta (mmdet 2.x `CLASSES`,
3.x `dataset_meta.classes`; COCO's ids when they are COCO's 80 names) and generic names otherwise; `coco`
forces COCO's 80, `generic` gives class_0..; a JSON URI gives a list of names or of {"id", "name"}.
Unknown, missing or mis-shaped keys are a one-line error (exit 2), never a partial load. Prints a summary
and, last, one JSON object.
"""

import json

import _bootstrap  # noqa: F401  (before any pipeline import: makes `pipeline` the package)

from pipeline.cli import default_config, fail, job_parser, load_job_config, run_main

# COCO 2017's 80 detection classes in the authors' label order, with their COCO category ids
_SKIP_GROUPS = ("rpn_head", "roi_head", "bbox_head", "query_head.downsample", "aux_pos_trans")


def coco_categories() -> list[dict]:
    """COCO's 80 categories with their ids (1..90 with gaps), from torchvision's COCO weights metadata (index =
    category id; "__background__" and the "N/A" gaps dropped)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [{"id": i, "name": n} for i, n in enumerate(names) if n not in ("__background__", "N/A")]


def categories_for(choice: str, meta_classes: list[str] | None, num_classes: int) -> tuple[list[dict], str]:
    """(categories [{id, name}], where they came from) for `--categories` (see the module docstring)."""
    from pipeline import storage

    coco = coco_categories()
    if choice == "coco":
        cats, how = coco, "COCO's 80 (--categories coco)"
    elif choice == "generic" or (choice == "auto" and meta_classes is None):
        cats = [{"id": i + 1, "name": f"class_{i}"} for i in range(num_classes)]
        how = "generic names (no class names in the checkpoint's meta; --categories coco gives COCO's)"
    elif choice == "auto":
        coco_names = [c["name"] for c in coco]
        own = [{"id": i + 1, "name": n} for i, n in enumerate(meta_classes)]
        cats = coco if meta_classes == coco_names else own
        how = "checkpoint meta" + (" (COCO's 80)" if cats is coco else "")
    else:
        items = storage.read_json(choice)
        if not isinstance(items, list):
            raise ValueError(f"--categories {choice!r}: expected a JSON list of names or of {{id, name}}")
        cats = [c if isinstance(c, dict) else {"id": i + 1, "name": str(c)} for i, c in enumerate(items)]
        how = choice
    if len(cats) != num_classes:
        raise ValueError(f"categories from {how}: {len(cats)} names, the model has num_classes={num_classes}")
    return cats, how


def _groups(names: list[str], labels: tuple[str, ...] | None = None) -> str:
    """`label count, ...`: by the first of `labels` each name contains, else by its last component."""
    counts: dict[str, int] = {}
    for n in names:
        label = next((g for g in labels if g in n), n) if labels else n.rsplit(".", 1)[-1]
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def main() -> None:
    p = job_parser(__doc__, default_config("configs/model/co_dino_r50.yaml"))
    p.add_argument("--src", required=True, help="official checkpoint .pth (any storage URI)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (any storage URI)")
    p.add_argument("--categories", default="auto", help="auto | coco | generic | URI of a JSON list")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load files holding other pickled objects (mmengine message_hub): runs code from it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    args = p.parse_args()

    def run() -> None:
        import os
        import tempfile

        import torch

        from pipeline import storage
        from pipeline.checkpoints import convert
        from pipeline.config import dump_yaml, replace
        from pipeline.train import checkpoint as ckpt_io

        job = load_job_config(args.config, args.overrides)
        job = replace(job, **{"model.backbone.pretrained": False, "model.backbone.weights": None})
        cfg = job.model
        if storage.exists(storage.join(args.out, ckpt_io.MODEL)) and not args.overwrite:
            fail(f"{args.out!r} already holds a checkpoint ({ckpt_io.MODEL}); pass --overwrite to replace it")

        obj = convert.load_checkpoint_bytes(storage.read_bytes(args.src), args.trust_pickle)
        sd, meta = convert.split_checkpoint(obj)
        del obj
        conv = convert.convert_checkpoint(sd, cfg.co.aux_heads, cfg.backbone.out_indices, cfg.loss.fed_loss)
        if conv.unknown:
            raise ValueError(convert.unknown_keys_message(conv.unknown))
        cats, cats_how = categories_for(args.categories, convert.checkpoint_classes(meta), cfg.num_classes)
        from pipeline.models import build_model

        try:
            with torch.device("meta"):  # names and shapes only: nothing allocated, no random init
                model = build_model(cfg)
        except RuntimeError:
            model = build_model(cfg)
        state = convert.fit_to_model(conv, model.state_dict())
        model.load_state_dict(state, strict=True, assign=True)  # the strict load itself
        state = {k: v.contiguous() for k, v in state.items()}

        trainer_state = {"epoch": 0, "step": 0, "data_position": {}, "best_ap": -1.0, "imported_from": args.src,
                         "import": conv.summary(),
                         "source_meta": {k: str(meta[k])[:200] for k in ("mmdet_version", "epoch", "iter")
                                         if k in meta}}  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="codetr-import-") as tmp:
            ckpt_io.save_checkpoint(tmp, model_state=state, trainer_state=trainer_state,
                                    config_yaml=dump_yaml(job), categories=cats)  # fmt: skip
            storage.makedirs(args.out)
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_bytes(storage.join(args.out, name), f.read())

        k = ", ".join(cfg.co.aux_heads) or "none"
        print(f"source:          {args.src} ({len(sd)} tensors, backbone naming {conv.backbone_format}, "
              f"aux heads {', '.join(conv.checkpoint_aux_heads) or 'none'})")
        print(f"mapped:          {len(state)} tensors -> K={len(cfg.co.aux_heads)} model ({k}), strict load")
        print(f"skipped aux:     {len(conv.skipped_aux)}" +
              (f" ({_groups(conv.skipped_aux, _SKIP_GROUPS)})" if conv.skipped_aux else ""))
        print(f"dropped EMA:     {len(conv.dropped_ema)}")
        print(f"dropped buffers: {len(conv.dropped_buffers)}" +
              (f" ({_groups(conv.dropped_buffers)})" if conv.dropped_buffers else ""))
        print(f"categories:      {len(cats)} from {cats_how}")
        print(f"out:             {args.out}")
        print(json.dumps({"out": args.out, "src": args.src, **conv.summary(), "mapped": len(state),
                          "skipped_aux_keys": conv.skipped_aux, "categories": cats_how}))  # fmt: skip

    run_main(run)


if __name__ == "__main__":
    main()
