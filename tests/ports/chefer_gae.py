"""Port of hila-chefer/Transformer-MM-Explainability, notebook `Transformer_MM_explainability_ViT.ipynb`:
`avg_heads` (rule 5), `apply_self_attention_rules` (rule 6) and `generate_relevance` (docs/methods/gae.md §3).

Run on a timm model instead of the notebook's `ViT_new.py` copy: the attention map is the output of attn_drop of an
unfused deep copy (ViT_new's `save_attention_map`) and its gradient comes from a tensor hook on it
(`attn.register_hook`); batch 1, `R += avg_heads(cam, grad) @ R`; the map is R[0, P:] for P prefix tokens (R[0, 1:]
in the notebook).
"""
import copy

import numpy as np
import torch


# rule 5 from paper
def avg_heads(cam, grad):
    cam = cam.reshape(-1, cam.shape[-2], cam.shape[-1])
    grad = grad.reshape(-1, grad.shape[-2], grad.shape[-1])
    cam = grad * cam
    cam = cam.clamp(min=0).mean(dim=0)
    return cam


# rule 6 from paper
def apply_self_attention_rules(R_ss, cam_ss):
    R_ss_addition = torch.matmul(cam_ss, R_ss)
    return R_ss_addition


def generate_relevance(model, input, index=None):
    """The notebook's `generate_relevance` on a timm model (batch 1): the attention map is the output of attn_drop
    (ViT_new's `save_attention_map`) and its gradient comes from a tensor hook on it (`attn.register_hook`)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    maps, grads = {}, {}

    def fwd(i):
        def hook(mod, inp, out):
            maps[i] = out
            out.register_hook(lambda g: grads.__setitem__(i, g))
        return hook

    for i, blk in enumerate(model.blocks):
        blk.attn.attn_drop.register_forward_hook(fwd(i))
    output = model(input)
    if index is None:
        index = np.argmax(output.cpu().data.numpy(), axis=-1)
    one_hot = np.zeros((1, output.size()[-1]), dtype=np.float32)
    one_hot[0, index] = 1
    one_hot = torch.from_numpy(one_hot).requires_grad_(True)
    one_hot = torch.sum(one_hot * output)
    model.zero_grad()
    one_hot.backward(retain_graph=True)

    num_tokens = maps[0].shape[-1]
    R = torch.eye(num_tokens, num_tokens, dtype=output.dtype)
    for i in range(len(model.blocks)):
        grad = grads[i]
        cam = maps[i]
        cam = avg_heads(cam, grad)
        R += apply_self_attention_rules(R, cam).detach()
    return R[0, model.num_prefix_tokens:]  # [0, 1:] for P prefix tokens
