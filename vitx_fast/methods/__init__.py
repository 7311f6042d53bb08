"""Explanation methods, one package each; importing this package registers every built-in method."""
from vitx_fast.methods import agcam, daam, gae, grad_rollout, lrp, reciprocam, rollout, tame  # noqa: F401
from vitx_fast.methods.registry import get_method, list_methods, register_method

__all__ = ["get_method", "list_methods", "register_method"]
