"""T-TAME (Ntrougkas, Gkalelis, Mezaris 2024): a trained attention mechanism on a frozen timm ViT, specs/ttame.md."""
from vitx_fast.tame.checkpoint import BackboneMismatchError, TameCheckpointError, load_tame
from vitx_fast.tame.module import AttentionTAME, TAMEExplainer
from vitx_fast.tame.train import train_tame

__all__ = ["AttentionTAME", "BackboneMismatchError", "TAMEExplainer", "TameCheckpointError", "load_tame",
           "train_tame"]
