"""Ports of the authors' T-TAME code, IDT-ITI/T-TAME `src/tame/...` (docs/methods/tame.md §3), generalised only where
docs/methods/tame.md §3 says so (P prefix rows and the model's (h, w) grid instead of 1 CLS row and 14 x 14; image
size instead of 224). The metric ports of `src/tame/metrics.py` are in tests/ports/metrics_ttame.py.

- `RefAttentionTAME`: attention/tame.py AttentionTAME (resize to (min(h, 56), min(w, 56)); the reference's is square).
- `ref_preprocess`: attention/factory.py PreprocessSeq.forward_vit_b_16.
- `RefGeneric`: composite_models.py Generic with "new" train policy, features by forward hooks on blocks[i].norm1 of
  an unfused timm model (docs/methods/tame.md §1.1: in timm the FX node `ln` is a forward hook on blocks[i].norm1),
  get_a / get_c.
- `classic_loss`, `smoothness_loss`, `area_loss`: attention/arrangement.py Arrangement. `smoothness_loss_any_grid`,
  `classic_loss_any_grid`: the same with the four border terms summed one by one (identical for square maps, defined
  on non-square ones, where the reference's (B, K, w) + (B, K, h) broadcast fails).
- `get_optim`, `get_schedule`: model_prep.py (optimizer_type "SGD", schedule_type "equal").
- `literal_c`: the test driver (norm1 hooks on an unfused deep copy, PreprocessSeq, AttentionTAME in eval with an
  explainer's weights).
"""
from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import optim
from torch.optim import lr_scheduler


class RefAttentionTAME(nn.Module):
    def __init__(self, ft_size: List[torch.Size], num_classes=1000):
        super().__init__()
        feat_height = ft_size[0][2] if ft_size[0][2] <= 56 else 56
        feat_width = ft_size[0][3] if ft_size[0][3] <= 56 else 56  # generalised: the reference is square
        self.interpolate = lambda inp: F.interpolate(
            inp, size=(feat_height, feat_width), mode="bilinear", align_corners=False
        )
        in_channels_list = [o[1] for o in ft_size]
        self.convs = nn.ModuleList(
            [nn.Conv2d(in_channels=c, out_channels=c, kernel_size=1, padding=0, bias=True) for c in in_channels_list]
        )
        self.bn_channels = in_channels_list
        self.bns = nn.ModuleList([nn.BatchNorm2d(channels) for channels in self.bn_channels])
        self.relu = nn.ReLU()
        fuse_channels = sum(in_channels_list)
        self.fuser = nn.Conv2d(in_channels=fuse_channels, out_channels=num_classes, kernel_size=1, padding=0, bias=True)

    def forward(self, features):
        feature_maps = features
        class_maps = [op(feature) for op, feature in zip(self.convs, feature_maps)]
        class_maps = [op(feature) for op, feature in zip(self.bns, class_maps)]
        class_maps = [class_map + feature_map for class_map, feature_map in zip(class_maps, feature_maps)]
        class_maps = [self.relu(class_map) for class_map in class_maps]
        class_maps = [self.interpolate(feature) for feature in class_maps]
        class_maps = torch.cat(class_maps, 1)
        c = self.fuser(class_maps)
        a = torch.sigmoid(c)
        return a, c


def ref_preprocess(seq_list, num_prefix, grid):
    # discard class tocken (generalised: all P prefix rows)
    seq_list = [seq[:, num_prefix:, :] for seq in seq_list]
    # reshape (generalised: the model's grid)
    seq_list = [seq.reshape(seq.size(0), grid[0], grid[1], seq.size(2)) for seq in seq_list]
    # bring channels after batch dimension
    seq_list = [seq.transpose(2, 3).transpose(1, 2) for seq in seq_list]
    return seq_list


class RefGeneric(nn.Module):
    """Generic(train_method="new", masking=...) around a timm ViT with norm1 forward hooks."""

    def __init__(self, mdl, layers, num_prefix, grid, num_classes, masking="random"):
        super().__init__()
        self.body = mdl
        self.layers = layers
        self.num_prefix, self.grid = num_prefix, grid
        d = mdl.embed_dim
        self.attn_mech = RefAttentionTAME([torch.Size([2, d, grid[0], grid[1]]) for _ in layers], num_classes)
        self.masking = masking
        self._feats = {}
        for i in layers:
            mdl.blocks[i].norm1.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def fn(module, inp, out):
            self._feats[i] = out
        return fn

    def features(self, x):
        self._feats = {}
        out = self.body(x)
        return {i: self._feats[i] for i in self.layers}, out

    def forward(self, x):
        features, old_logits = self.features(x)
        self.labels = old_logits.argmax(dim=1)
        a, c = self.attn_mech(ref_preprocess(list(features.values()), self.num_prefix, self.grid))
        self.a = a
        self.c = c
        if self.training:
            logits = self.new_train_policy(a, self.labels, x)
            self.logits = logits
            return logits
        self.logits = old_logits
        return old_logits

    def new_train_policy(self, masks, labels, inp):
        batches = masks.size(0)
        masks = masks[torch.arange(batches), labels, :, :].unsqueeze(1)
        masks = F.interpolate(masks, size=tuple(inp.shape[-2:]), mode="bilinear", align_corners=False)
        x_norm = masks * inp
        self._feats = {}
        return self.body(x_norm)

    def get_c(self, labels):
        if self.masking == "random":
            return self.c[:, labels, :, :]
        batches = self.c.size(0)
        return self.c[torch.arange(batches), labels, :, :].unsqueeze(1)

    def get_a(self):
        labels = self.labels
        if self.masking == "random":
            return self.a[:, labels, :, :]
        batches = self.a.size(0)
        return self.a[torch.arange(batches), labels, :, :].unsqueeze(1)


# ---------------------------------------------------------------- Arrangement
CE_COEFF, AREA_COEFF, SMOOTH_COEFF, AREA_POWER = 1.5, 2, 0.01, 0.3


def area_loss(masks):
    if AREA_POWER != 1:
        masks = (masks + 0.0005) ** AREA_POWER
    return torch.mean(masks)


def smoothness_loss(masks, power=2, border_penalty=0.3):
    B, _, _, _ = masks.size()
    x_loss = torch.sum((torch.abs(masks[:, :, 1:, :] - masks[:, :, :-1, :])) ** power)
    y_loss = torch.sum((torch.abs(masks[:, :, :, 1:] - masks[:, :, :, :-1])) ** power)
    if border_penalty > 0:
        border = float(border_penalty) * torch.sum(
            masks[:, :, -1, :] ** power + masks[:, :, 0, :] ** power + masks[:, :, :, -1] ** power
            + masks[:, :, :, 0] ** power
        )
    else:
        border = 0.0
    return (x_loss + y_loss + border) / float(power * B)


def classic_loss(logits, labels, masks):
    labels = labels.long()
    variation_loss = SMOOTH_COEFF * smoothness_loss(masks)
    a_loss = AREA_COEFF * area_loss(masks)
    cross_entropy = CE_COEFF * nn.CrossEntropyLoss()(logits, labels)
    loss = cross_entropy + a_loss + variation_loss
    return [loss, cross_entropy, a_loss, variation_loss]


# ---------------------------------------------------------------- model_prep
def get_optim(attn_mech, momentum=0.9, weight_decay=5e-4):
    g = [], [], []
    for v in attn_mech.modules():
        for p_name, p in v.named_parameters(recurse=False):
            if p_name == "bias":
                g[2].append(p)
            else:
                g[0].append(p)
    optimizer = optim.SGD(g[2], lr=1e-7, momentum=momentum, nesterov=True)
    optimizer.add_param_group({"params": g[0], "weight_decay": weight_decay})
    return optimizer


def get_schedule(optimizer, currect_epoch, lr, epochs, total_steps, steps_per_epoch=None):
    return lr_scheduler.OneCycleLR(
        optimizer, lr, epochs=epochs if total_steps is None else None, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, last_epoch=(currect_epoch * steps_per_epoch) if currect_epoch != 0 else -1,
    )


def smoothness_loss_any_grid(masks, power=2, border_penalty=0.3):
    """Arrangement.smoothness_loss with the four border terms summed one by one: identical for square maps, and
    defined on non-square ones (where the reference's (B, K, w) + (B, K, h) broadcast fails)."""
    B = masks.size(0)
    x_loss = torch.sum((torch.abs(masks[:, :, 1:, :] - masks[:, :, :-1, :])) ** power)
    y_loss = torch.sum((torch.abs(masks[:, :, :, 1:] - masks[:, :, :, :-1])) ** power)
    border = float(border_penalty) * (torch.sum(masks[:, :, -1, :] ** power) + torch.sum(masks[:, :, 0, :] ** power)
                                      + torch.sum(masks[:, :, :, -1] ** power) + torch.sum(masks[:, :, :, 0] ** power))
    return (x_loss + y_loss + border) / float(power * B)


def classic_loss_any_grid(logits, labels, masks):
    return (CE_COEFF * nn.CrossEntropyLoss()(logits, labels.long()) + AREA_COEFF * area_loss(masks)
            + SMOOTH_COEFF * smoothness_loss_any_grid(masks))


def literal_c(model, explainer, images) -> torch.Tensor:
    """c (B, C, h', w') from the literal port: norm1 forward hooks on an unfused deep copy, PreprocessSeq, the
    reference AttentionTAME in eval with the explainer's weights."""
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    grid = tuple(m.patch_embed.grid_size)
    ref = RefGeneric(m, explainer.layers, m.num_prefix_tokens, grid, explainer.num_classes, masking="diagonal")
    ref.attn_mech.load_state_dict(explainer.attn_mech.state_dict())
    ref = ref.to(images.dtype).eval()
    with torch.no_grad():
        ref(images)
    return ref.c, ref.labels
