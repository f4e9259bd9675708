"""Parameter counts of a model config, per component (no data, no weights; built on the meta device).

    python jobs/model_info.py --config configs/model/co_dino_r50.yaml
    python jobs/model_info.py --config configs/model/co_dino_tiny.yaml --set model.co.aux_heads=[]
    ray job submit --working-dir . -- python jobs/model_info.py --config configs/model/co_dino_swin_l.yaml

Counts include the affine weights of frozen BatchNorms (buffers here, parameters in the authors' checkpoints),
so the totals compare with the authors' numbers (Co-DINO R50, K = 2: 65,204,005 total, 48,064,780 deployed).
`inference_params` is the deployed K = 0 model (`CoDETR.inference_state_dict()`, the DN label embedding
included). Then the loss-weight table of the auxiliary terms (pipeline/models/loss_weights.py: base x factor =
effective, each term's config source), the one place lambda1 / lambda2 and every per-term weight meet. The last
line is one JSON object (`loss_weights`: aux loss key -> effective weight, last decoder layer's keys).
"""

import json

import _bootstrap  # noqa: F401  (before any pipeline import: makes `pipeline` the package)

from pipeline.cli import default_config, job_parser, load_job_config, run_main

COMPONENTS = {  # name -> state-dict prefixes
    "backbone": ("backbone.",),
    "neck": ("neck.",),
    "encoder": ("transformer.encoder.", "transformer.level_embeds"),
    "two_stage": ("transformer.enc_output", "transformer.query_embed", "transformer.pos_trans"),  # query_embedding too
    "decoder": ("transformer.decoder.",),
    "heads": ("head.",),
    "denoising": ("denoising.",),
    "aux_heads": ("aux_heads.", "adapter.", "aux_query_proj."),
}
_STATS = ("running_mean", "running_var", "num_batches_tracked")


def count(model) -> dict[str, int]:
    """{state-dict name: numel} of parameters plus frozen-BN affine buffers."""
    params = {k: p.numel() for k, p in model.named_parameters()}
    for k, b in model.named_buffers():
        if k.endswith(("weight", "bias")) and not k.endswith((*_STATS, "fed_loss_weight")):  # FedLoss: no param
            params[k] = b.numel()
    return params


def main() -> None:
    p = job_parser(__doc__, default_config("configs/model/co_dino_r50.yaml"))
    p.add_argument("--device", default="meta", help="device to build on (meta: no memory)")
    args = p.parse_args()

    def run() -> None:
        import torch

        from pipeline.models import build_model

        job = load_job_config(args.config, args.overrides)
        model_cfg = job.model
        if model_cfg.backbone.pretrained:  # counting needs no weights
            from pipeline.config import replace

            model_cfg = replace(model_cfg, **{"backbone.pretrained": False})
        try:
            with torch.device(args.device):
                model = build_model(model_cfg)
        except RuntimeError as e:  # a module that reads tensor values at init cannot be built on meta
            if args.device != "meta":
                raise
            print(f"note: meta build failed ({str(e).splitlines()[0]}); building on cpu")
            model = build_model(model_cfg)
        sizes = count(model)
        per = {name: sum(n for k, n in sizes.items() if k.startswith(pre)) for name, pre in COMPONENTS.items()}
        other = sum(sizes.values()) - sum(per.values())
        if other:
            per["other"] = other
        deployed = set(model.inference_state_dict())
        total = sum(sizes.values())
        inference = sum(n for k, n in sizes.items() if k in deployed)
        for name, n in per.items():
            print(f"{name:>12s} {n:>14,d}")
        print(f"{'total':>12s} {total:>14,d}\n{'inference':>12s} {inference:>14,d}")
        from pipeline.models.loss_weights import format_table, loss_weight_rows

        rows = loss_weight_rows(model_cfg)
        if rows:
            print(f"\naux loss weights (lambda1 {model_cfg.co.lambda1}, lambda2 {model_cfg.co.lambda2}):")
            print(format_table(rows))
        print(json.dumps({"config": args.config, "total_params": total, "inference_params": inference,
                          "components": per, "aux_heads": list(model_cfg.co.aux_heads),
                          "loss_weights": {r.key: r.effective for r in rows}}))  # fmt: skip

    run_main(run)


if __name__ == "__main__":
    main()
