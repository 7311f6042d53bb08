"""`vitx train-tame`: train a T-TAME explainer for a (frozen) timm ViT."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    """Add the `train-tame` subcommand to an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "train-tame", help="train a T-TAME explainer (trained attention mechanism) for a frozen timm ViT",
        description="Train T-TAME on a frozen backbone (loss 1.5 CE + 2 Area + 0.01 TV, SGD Nesterov, one-cycle lr). "
                    "Checkpoints every epoch to --out; --resume continues an interrupted run. The result is "
                    "OUT/tame.safetensors: vx.explain(model, x, method='tame', explainer=vx.load_tame(path)).")
    p.add_argument("--model", default="demo", help="'demo' (bundled) or a timm model name")
    p.add_argument("--checkpoint", help="local backbone weights (.safetensors / .pth) for --model")
    p.add_argument("--data", default="bench",
                   help="'bench' (the bundled benchmark's train split) or a folder of images (labels ignored)")
    p.add_argument("--bench-n", type=int, default=5000, help="number of generated training scenes with --data bench")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="one-cycle max learning rate")
    p.add_argument("--layers", type=int, nargs="+", help="feature blocks (norm1 outputs); default: the last three")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for an image folder")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", required=True, help="folder for epoch checkpoints and the final tame.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_tame)
    return p


def cmd_train_tame(args) -> int:
    import torch

    from vitx_fast.cli._common import CLIError, load_model
    from vitx_fast.methods.tame.checkpoint import TameCheckpointError
    from vitx_fast.methods.tame.train import FINAL_NAME, train_tame

    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = load_model(args.model, args.checkpoint)
    out = Path(args.out)
    try:
        train_tame(model, args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, layers=args.layers,
                   out=out, resume=args.resume, seed=args.seed, num_workers=args.workers, bench_n=args.bench_n,
                   mean=cfg.get("mean"), std=cfg.get("std"), progress=not args.quiet)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, TameCheckpointError) as exc:
        raise CLIError(str(exc)) from None
    print(f"T-TAME explainer written: {out / FINAL_NAME}")
    return 0
