"""Port of LeemSaebom/Attention-Guided-CAM-Visual-Explanations-of-Vision-Transformer-Guided-by-Self-Attention,
`Methods/AGCAM/AGCAM.py` (`AGCAM.generate`), with the capture of the vendored
`Methods/AGCAM/ViT_for_AGCAM/models/vision_transformer.py` rebuilt on stock timm (docs/methods/agcam.md §3).

The vendored `Attention.forward` starts with `x = x.detach()` (here a forward pre-hook on every blk.attn), exposes the
pre-softmax scaled scores through an identity module (here rebuilt from a hook on attn.qkv, docs/methods/agcam.md
§1.3) and the gradient of the post-softmax attention through a full backward hook (here on attn.attn_drop of an
unfused model). Generalised: the P prefix columns are dropped (the reference drops column 0) and the map is on the
input's h x w grid (the reference reshapes to 14 x 14). `literal_maps` is the test driver (batch 1, one call per
image).
"""
from __future__ import annotations

import copy

import torch


class LiteralAGCAM:
    """AGCAM.generate, batch 1, on a deep copy of an unfused timm ViT."""

    def __init__(self, model, head_fusion="sum", layer_fusion="sum", detach=True):
        self.model = copy.deepcopy(model).eval()
        self.head_fusion, self.layer_fusion = head_fusion, layer_fusion
        self.attn_matrix, self.grad_attn, self.full_grads = [], [], []
        for blk in self.model.blocks:
            attn = blk.attn
            # otherwise attn_drop never runs and its hook captures nothing (docs/methods/agcam.md §3)
            attn.fused_attn = False
            if detach:
                attn.register_forward_pre_hook(lambda m, args: (args[0].detach(),) + tuple(args[1:]))
            attn.qkv.register_forward_hook(self._score_hook(attn))
            attn.attn_drop.register_full_backward_hook(self.get_grad_attn)

    def _score_hook(self, attn):
        def hook(module, inputs, output):
            B, T, _ = output.shape
            q, k, _ = output.reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            self.attn_matrix.append(((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).detach())  # [B, H, 1, T]
        return hook

    def get_grad_attn(self, module, grad_input, grad_output):
        self.full_grads.append(grad_output[0])
        self.grad_attn.append(grad_output[0][:, :, 0:1, :])

    def generate(self, input_tensor, cls_idx=None):
        self.attn_matrix, self.grad_attn, self.full_grads = [], [], []
        self.model.zero_grad()
        output = self.model(input_tensor)
        _, prediction = torch.max(output, 1)
        loss = output[0, prediction[0]] if cls_idx is None else output[0, cls_idx]
        loss.backward()
        self.attn_matrix.reverse()
        attn, gradient = self.attn_matrix[0], self.grad_attn[0]
        for i in range(1, len(self.attn_matrix)):
            attn = torch.concat((attn, self.attn_matrix[i]), dim=0)
            gradient = torch.concat((gradient, self.grad_attn[i]), dim=0)
        gradient = torch.nn.functional.relu(gradient)
        attn = torch.sigmoid(attn)
        mask = gradient * attn
        # the reference drops column 0 (P = 1); generalised to the P prefix columns and an h x w grid
        P = self.model.num_prefix_tokens
        # the grid of this input (the model's grid_size unless dynamic_img_size runs it at another size)
        (ph, pw), (H_in, W_in) = self.model.patch_embed.patch_size, input_tensor.shape[-2:]
        h, w = H_in // ph, W_in // pw
        mask = mask[:, :, :, P:].unsqueeze(0)  # b l h z p
        mask = mask.sum(2) if self.head_fusion == "sum" else mask.mean(2)
        mask = mask.sum(1) if self.layer_fusion == "sum" else mask.mean(1)
        return prediction, mask.reshape(1, 1, h, w)


def literal_maps(model, images, targets=None, **kw) -> torch.Tensor:
    ref = LiteralAGCAM(model, **kw)
    out = []
    for i in range(images.shape[0]):
        cls = None if targets is None else int(targets[i])
        out.append(ref.generate(images[i:i + 1], cls)[1][0, 0])
    return torch.stack(out)
