"""Port of ly9802/DynamicAccumulatedAttentionMap (docs/methods/daam.md §3): `ActivationAndGradients` and
`DynamicAccumulatedAttentionMap` of `utils/DAAM.py` (supervised) and `utils/SelfSupervisedViT_DAAM.py` (SSL), and
`contri_weight_generate` of `DINO_DAAM_Visualization_oneSample.py`, run with their hooks on an unfused timm model,
batch 1.

Generalisations, all named: the reshape keeps columns P: on an h x w grid (the reference assumes P = 1 and a square
grid); q_norm / k_norm are applied in the recomputation hook (docs/methods/daam.md §1.1: the engine uses the model's
real logits); `num_classes` of the kNN vote is a parameter (1000 in the reference); the final cv2 resize is left out
(no cv2 here), so the comparison is on the h x w grid. `literal_supervised`, `literal_ssl` and `literal_on_grid` are
the test drivers (one call per image).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vitx_fast.methods.daam.memory_bank import MemoryBank


class ClassifierOutputTarget:
    def __init__(self, category):
        self.category = category

    def __call__(self, model_output):
        if len(model_output.shape) == 1:
            return model_output[self.category]
        return model_output[:, self.category]


class ActivationAndGradients:
    def __init__(self, model, target_layers):
        self.model = model
        self.gradients, self.activations, self.handles = [], [], []
        for target_layer in target_layers:
            self.handles.append(target_layer[0].register_forward_hook(self.change_activation))
            self.handles.append(target_layer[1].register_forward_hook(self.prj_gradient))

    def __call__(self, x):
        self.activations, self.gradients = [], []
        return self.model(x)

    def change_activation(self, module, input, output):
        if not hasattr(output[0], "requires_grad") or not output[0].requires_grad:
            return
        x = input[0]
        B, N, C = x.shape
        qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, C // module.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = module.q_norm(q), module.k_norm(k)  # generalisation (identity unless qk_norm)
        attn = (q @ k.transpose(-2, -1)) * module.scale
        attn = attn.softmax(dim=-1)
        attn = module.attn_drop(attn)
        focus = attn[:, :, 0]
        focus = focus.unsqueeze(dim=-1)
        elementwise_product1 = torch.mul(focus, v)
        elementwise_product = elementwise_product1.transpose(1, 2).reshape(B, N, C)
        self.activations.append(elementwise_product.cpu().detach())

    def prj_gradient(self, module, input, output):
        if not hasattr(input[0], "requires_grad") or not input[0].requires_grad:
            return
        input[0].register_hook(self.save_grad)

    def save_grad(self, grad):
        weight = grad[:, 0, :]
        self.gradients = [weight.cpu().detach()] + self.gradients

    def release(self):
        for handle in self.handles:
            handle.remove()


def make_reshape_transform(P, h, w):
    def reshape_transform(tensor):
        bs, _num_tokens, dim = tensor.shape
        result = tensor[:, P:, :].reshape(bs, h, w, dim)  # reference: [:, 1:] and a sqrt(num_tokens - 1) square
        return result.transpose(2, 3).transpose(1, 2)
    return reshape_transform


class LiteralDAAM:
    """Both reference classes: supervised (utils/DAAM.py) and SSL (utils/SelfSupervisedViT_DAAM.py). They differ in the
    ReLU on the gradients, in `non_liear_mapping` (False / True by default) and in the map given to the linear mapping
    (the ReLU'd or the raw accumulation, equal since every block map is >= 0)."""

    def __init__(self, model, ssl=False, norm=False, non_liear_mapping=None):
        self.model = copy.deepcopy(model).eval()
        for blk in self.model.blocks:
            blk.attn.fused_attn = False
        self.ssl, self.norm = ssl, norm
        self.non_liear_mapping = ssl if non_liear_mapping is None else non_liear_mapping
        P, (h, w) = self.model.num_prefix_tokens, self.model.patch_embed.grid_size
        self.reshape_transform = make_reshape_transform(P, h, w)
        target_layers = [(blk.attn, blk.attn.proj) for blk in self.model.blocks]
        self.activations_and_grads = ActivationAndGradients(self.model, target_layers)
        self.cam_per_block_list = None

    # supervised: DynamicAccumulatedAttentionMap.forward
    def supervised(self, input_tensor, target_label=None):
        input_tensor = torch.autograd.Variable(input_tensor, requires_grad=True)
        score_vector = self.activations_and_grads(input_tensor)
        if target_label is None:
            predicted_label = np.argmax(score_vector.cpu().data.numpy(), axis=-1)[0]
            target_categories = np.argmax(score_vector.cpu().data.numpy(), axis=-1)
            target_label = [ClassifierOutputTarget(category) for category in target_categories]
        else:
            predicted_label = target_label[0].category
        feature_matrix_list = self.activations_and_grads.activations
        self.model.zero_grad()
        score = sum([target(output) for target, output in zip(target_label, score_vector)])
        score.backward(retain_graph=True)
        gradients_list = self.activations_and_grads.gradients
        self.gradients_list = gradients_list
        return self.generate_accumul_cam(gradients_list, feature_matrix_list), predicted_label

    # SSL: forward then generate_fam
    def ssl_forward(self, input_tensor):
        input_tensor = torch.autograd.Variable(input_tensor, requires_grad=True)
        return self.activations_and_grads(input_tensor)

    def generate_fam(self, feature_vector, coefficient):
        feature_matrix_list = self.activations_and_grads.activations
        self.model.zero_grad()
        feature_vector.backward(gradient=coefficient, retain_graph=True)
        gradients_list = self.activations_and_grads.gradients
        self.gradients_list = gradients_list
        return self.generate_accumul_cam(gradients_list, feature_matrix_list)

    def generate_accumul_cam(self, gradients_list, feature_matrix_list):
        activations_list = [self.reshape_transform(a) for a in feature_matrix_list]
        weights_list = [g.unsqueeze(dim=-1).unsqueeze(dim=-1) for g in gradients_list]
        activations_list = [a.cpu().data.numpy() for a in activations_list]
        grads_list = [g.cpu().data.numpy() for g in weights_list]
        cam_per_block_list = []
        for i in range(len(activations_list)):
            gradient = grads_list[i]
            activation_map = activations_list[i]
            if not self.ssl:
                gradient = np.maximum(gradient, 0)
            weighted_activations = gradient * activation_map
            cam = weighted_activations.sum(axis=1)
            cam = np.maximum(cam, 0)
            if self.norm:
                cam = self.max_min_normalize(cam)
            cam_per_block_list.append(cam)
        self.cam_per_block_list = cam_per_block_list
        dynamic_cam_list = [np.concatenate(cam_per_block_list[0:i], axis=0)
                            for i in range(1, len(cam_per_block_list) + 1)]
        accumulated = np.concatenate(cam_per_block_list, axis=0)
        accumul = accumulated.sum(axis=0)
        global_maximum = np.max(accumul.ravel())
        global_minimum = np.min(accumul.ravel())
        cam_list = []
        for dynamic_cam in dynamic_cam_list:
            accumul = dynamic_cam.sum(axis=0)
            accumul_positive = np.maximum(accumul, 0)
            if self.non_liear_mapping is False:
                normed_cam = self.global_max_min_norm(accumul_positive, global_maximum, global_minimum)
            else:
                normed_cam = self.global_max_min_norm_nonlinearmapping(
                    accumul_positive if not self.ssl else accumul, global_maximum, global_minimum)
            cam_list.append(normed_cam)  # the reference then cv2.resize-s to the input size
        return cam_list

    def max_min_normalize(self, cam):
        result = []
        for img in cam:
            minimum = np.min(img.ravel())
            img = img - minimum
            maximum = np.max(img.ravel()) + 1e-10
            img = img / (maximum)
            result.append(img)
        return np.float32(result)

    def global_max_min_norm(self, cam, global_maximum, global_minimum):
        current_maximum = np.max(cam.ravel())
        current_minimum = np.min(cam.ravel())
        img = (cam - global_minimum) / (current_maximum - global_minimum + 1e-10)
        img = np.maximum(img, 0)
        ratio = (current_maximum - current_minimum) / (global_maximum - global_minimum)
        r = 255 * ratio
        return np.uint8(r * img)

    def global_max_min_norm_nonlinearmapping(self, cam, global_maximum, global_minimum):
        img = (cam - 0) / (global_maximum - 0)
        img = self.sigmod_variant(img, 5)
        sigmod_maximum = np.max(img.ravel())
        sigmod_minimum = np.min(img.ravel())
        norm_img = (img - sigmod_minimum) / (sigmod_maximum - sigmod_minimum)
        return np.uint8(255 * norm_img)

    def sigmod(self, x):
        return 1 / (1 + np.exp(-x))

    def sigmod_variant(self, x, apha=1.0):
        y = self.sigmod(apha * x)
        return y - 0.5


def contribution_weight(product):
    simi_score = torch.sum(product, dim=-1, keepdim=False)
    if simi_score != 0:
        return torch.div(product, simi_score.abs())
    return product


def max_min_normal(coefficient):
    if coefficient.max() > coefficient.min():
        return torch.div(coefficient - coefficient.min(), coefficient.max() - coefficient.min())
    return torch.ones_like(coefficient)


def contri_weight_generate(feature_vector, memory_bank, train_labels, k=20, T=0.07, num_classes=1000):
    batch_size = feature_vector.size(dim=0)
    retrieval_one_hot = torch.zeros(k, num_classes).to(memory_bank.device)
    feature_vector_norm = F.normalize(feature_vector, dim=1, p=2, eps=1e-12)
    similarity = torch.mm(feature_vector_norm, memory_bank)
    distances, indices = similarity.topk(k, largest=True, dim=-1, sorted=True)
    selected_memorybank = torch.index_select(memory_bank, dim=-1, index=indices.squeeze(dim=0))
    candidates = train_labels.contiguous().view(1, -1).expand(batch_size, -1)
    retrieved_neighbors = torch.gather(candidates, dim=1, index=indices)
    selected_train_labels = retrieved_neighbors.contiguous().view(-1, 1)
    retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
    retrieval_one_hot.scatter_(1, selected_train_labels, 1)
    distances_transform = distances.clone().div_(T).exp_()
    temp3 = retrieval_one_hot.contiguous().view(batch_size, -1, num_classes)
    temp4 = distances_transform.contiguous().view(batch_size, -1, 1)
    temp5 = torch.mul(temp3, temp4)
    probs = torch.sum(temp5, dim=1, keepdim=False)
    _, predictions = probs.sort(dim=1, descending=True)
    predicted_class = predictions[:, 0].squeeze(dim=0)
    class_label = predicted_class.cpu().item()
    mask = torch.eq(retrieved_neighbors, predicted_class)
    num_channels = feature_vector.size(dim=1)
    mask2 = mask.expand(num_channels, -1)
    predictedclass_memorybank = torch.masked_select(selected_memorybank, mask2).contiguous().view(num_channels, -1)
    multiply = torch.mul(feature_vector_norm.unsqueeze(dim=2), predictedclass_memorybank.unsqueeze(dim=0))
    mean_multiply = torch.mean(multiply, dim=-1, keepdim=False)
    contri_weight = contribution_weight(mean_multiply[0])
    contri_weight = max_min_normal(contri_weight)
    return contri_weight, class_label


def literal_supervised(model, images, targets=None, **kw):
    """Per image: (uint8 maps (B, L, h, w), block maps (B, L, h, w), gradients (B, L, D), labels)."""
    ref = LiteralDAAM(model, **kw)
    out = []
    for i in range(images.shape[0]):
        tl = None if targets is None else [ClassifierOutputTarget(int(targets[i]))]
        cams, label = ref.supervised(images[i:i + 1], tl)
        out.append((np.stack(cams), np.concatenate(ref.cam_per_block_list), torch.cat(ref.gradients_list), label))
    return [torch.as_tensor(np.stack(z)) for z in zip(*out)]


def literal_ssl(model, images, bank: MemoryBank, k=20, T=0.07, **kw):
    ref = LiteralDAAM(model, ssl=True, **kw)
    out = []
    for i in range(images.shape[0]):
        fv = ref.ssl_forward(images[i:i + 1])
        w, label = contri_weight_generate(fv, bank.features.t(), bank.labels, k=k, T=T, num_classes=bank.num_classes)
        cams = ref.generate_fam(fv, w.unsqueeze(dim=0))
        out.append((np.stack(cams), np.concatenate(ref.cam_per_block_list), torch.cat(ref.gradients_list), label))
    return [torch.as_tensor(np.stack(z)) for z in zip(*out)]



def literal_on_grid(model, images, grid, ssl=False, bank=None, k=20, **kw):
    """literal_supervised / literal_ssl with the reshape on the grid of the images actually given."""
    ref = LiteralDAAM(model, ssl=ssl, **kw)
    ref.reshape_transform = make_reshape_transform(model.num_prefix_tokens, *grid)
    out = []
    for i in range(images.shape[0]):
        if ssl:
            fv = ref.ssl_forward(images[i:i + 1])
            wt, label = contri_weight_generate(fv, bank.features.t(), bank.labels, k=k, num_classes=bank.num_classes)
            cams = ref.generate_fam(fv, wt.unsqueeze(dim=0))
        else:
            cams, label = ref.supervised(images[i:i + 1])
        out.append((np.stack(cams), np.concatenate(ref.cam_per_block_list), label))
    return [torch.as_tensor(np.stack(z)) for z in zip(*out)]
