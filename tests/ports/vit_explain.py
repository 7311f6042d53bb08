"""Ports of jacobgil/vit-explain (docs/methods/rollout.md §3, docs/methods/grad_rollout.md §3).

- `vit_explain_rollout`: `vit_rollout.py`, `VITAttentionRollout` + `rollout` (batch 1): hooks on attn_drop, in-place
  discard via a view, `a / a.sum(dim=-1)` broadcast, result = a @ result, mask = result[0, 0, 1:] (generalised to P
  prefix rows).
- `grad_rollout`, `VITAttentionGradRollout`: `vit_grad_rollout.py`. The port keeps the reference's capture: a forward
  hook on every `attn_drop` (forward order) and a legacy `register_backward_hook` taking `grad_input[0]` (backward
  order). On timm in eval mode `attn_drop` returns its input tensor, so that legacy hook lands on the softmax's
  backward node and `grad_input[0]` is d y / d S (scaled pre-softmax scores), which the engine reproduces with
  `grad_wrt="logits"`. A second capture (`capture="tensor"`) with a tensor hook on the attn_drop output gives the
  method's d y / d A (`grad_wrt="probs"`, the default). Changes: an eye in the attentions' dtype (vit-explain's
  float32 eye cannot matmul float64), `renorm="row"` (the engine's keepdim variant), [0, 0, P:] for P prefix tokens,
  `pairing="correct"` (the gradients reversed), `raw=True` (before the display scaling).
- `grad_rollout_port`: the test driver (one image).
"""
import copy

import torch


def vit_explain_rollout(model, image, discard_ratio, head_fusion):
    """Literal port of vit-explain's VITAttentionRollout (batch 1): hooks on attn_drop, in-place discard via a view,
    `a / a.sum(dim=-1)` broadcast, result = a @ result, mask = result[0, 0, 1:] (generalised to P prefix rows)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    attentions = []
    handles = [blk.attn.attn_drop.register_forward_hook(lambda mod, i, o: attentions.append(o.cpu()))
               for blk in model.blocks]
    with torch.no_grad():
        model(image)
    for h in handles:
        h.remove()
    result = torch.eye(attentions[0].size(-1), dtype=attentions[0].dtype)
    with torch.no_grad():
        for attention in attentions:
            if head_fusion == "mean":
                fused = attention.mean(axis=1)
            elif head_fusion == "max":
                fused = attention.max(axis=1)[0]
            else:
                fused = attention.min(axis=1)[0]
            flat = fused.view(fused.size(0), -1)
            _, indices = flat.topk(int(flat.size(-1) * discard_ratio), -1, False)
            indices = indices[indices != 0]
            flat[0, indices] = 0
            eye = torch.eye(fused.size(-1), dtype=fused.dtype)
            a = (fused + 1.0 * eye) / 2
            a = a / a.sum(dim=-1)
            result = torch.matmul(a, result)
    P = model.num_prefix_tokens
    return result[0, 0, P:]


def grad_rollout(attentions, gradients, discard_ratio, renorm="jacobgil", num_prefix=1, raw=False):
    # eye in the attentions' dtype (vit-explain's float32 eye cannot matmul float64); renorm="row" is the engine's
    # keepdim variant; [0, 0, P:] for P prefix tokens
    result = torch.eye(attentions[0].size(-1), dtype=attentions[0].dtype)
    with torch.no_grad():
        for attention, grad in zip(attentions, gradients):
            weights = grad
            attention_heads_fused = (attention * weights).mean(axis=1)
            attention_heads_fused[attention_heads_fused < 0] = 0

            # Drop the lowest attentions, but
            # don't drop the class token
            flat = attention_heads_fused.view(attention_heads_fused.size(0), -1)
            _, indices = flat.topk(int(flat.size(-1) * discard_ratio), -1, False)
            # indices = indices[indices != 0]
            flat[0, indices] = 0

            I = torch.eye(attention_heads_fused.size(-1), dtype=attention_heads_fused.dtype)
            a = (attention_heads_fused + 1.0 * I) / 2
            a = a / a.sum(dim=-1) if renorm == "jacobgil" else a / a.sum(dim=-1, keepdim=True)
            result = torch.matmul(a, result)
    mask = result[0, 0, num_prefix:]
    if raw:  # before the display scaling (an all-zero row would give 0 / 0)
        return mask
    mask = mask / mask.max()
    return mask


class VITAttentionGradRollout:
    """vit-explain's class; capture="legacy" is the reference, "tensor" hooks the attn_drop output tensor."""

    def __init__(self, model, attention_layer_name='attn_drop', discard_ratio=0.9, capture="legacy"):
        self.model = copy.deepcopy(model).eval()
        for m in self.model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        self.discard_ratio = discard_ratio
        for name, module in self.model.named_modules():
            if attention_layer_name in name:
                module.register_forward_hook(self.get_attention)
                if capture == "legacy":
                    module.register_backward_hook(self.get_attention_gradient)
        self.capture = capture
        self.attentions = []
        self.attention_gradients = []

    def get_attention(self, module, input, output):
        self.attentions.append(output.cpu())
        if self.capture == "tensor":
            output.register_hook(lambda g: self.attention_gradients.append(g.cpu()))

    def get_attention_gradient(self, module, grad_input, grad_output):
        self.attention_gradients.append(grad_input[0].cpu())

    def __call__(self, input_tensor, category_index, renorm="jacobgil", pairing="jacobgil"):
        self.model.zero_grad()
        output = self.model(input_tensor)
        category_mask = torch.zeros(output.size(), dtype=output.dtype)
        category_mask[:, category_index] = 1
        loss = (output * category_mask).sum()
        loss.backward()
        grads = self.attention_gradients if pairing == "jacobgil" else self.attention_gradients[::-1]
        return grad_rollout(self.attentions, grads, self.discard_ratio, renorm, self.model.num_prefix_tokens)


def grad_rollout_port(model, image, target, ratio, capture="legacy", renorm="jacobgil", pairing="jacobgil"):
    return VITAttentionGradRollout(model, discard_ratio=ratio, capture=capture)(image, target, renorm, pairing)
