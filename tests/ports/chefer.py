"""Ports of hila-chefer/Transformer-Explainability (docs/methods/lrp.md §3, docs/methods/rollout.md §3).

- `chefer_rollout_baseline`: `baselines/ViT/ViT_explanation_generator.py`, `Baselines.generate_rollout` (head mean,
  (A + I) row-normalised with keepdim, start_layer 0), with the attention taken by hooks on attn_drop of an unfused
  timm model.
- Transformer attribution (method "grad"): `modules/layers_ours.py`, `baselines/ViT/ViT_LRP.py` and
  `LRP.generate_LRP` of `baselines/ViT/ViT_explanation_generator.py`, line by line (safe_divide, forward hooks saving
  detached inputs, relprop by autograd.grad on recomputed forwards, the z+ Linear rule with the beta term computed and
  multiplied by 0, whole-tensor sums in Add, batch-1 `[0]` indexing in the map). Minimal extensions, marked "ext:",
  let it run the test layouts: a token entry point (the timm model's own embedding output) for layouts whose
  embedding differs from ViT_LRP's, P prefix tokens (map = [0, P:]), LayerScale and q/k norms (identity relprop, like
  every norm), and the DeiT distilled head (Add of the two halves, each through its Linear and IndexSelect, Clone of
  the final tokens). `port_from_timm` copies a timm model's weights into the port; `port_map` is the test driver.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def chefer_rollout_baseline(model, image):
    """Chefer's `Baselines.generate_rollout`: head mean, (A + I) row-normalised with keepdim, start_layer 0."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    attns = []
    hs = [b.attn.attn_drop.register_forward_hook(lambda mod, i, o: attns.append(o)) for b in model.blocks]
    with torch.no_grad():
        model(image)
    for h in hs:
        h.remove()
    mats = [a.mean(dim=1) for a in attns]
    T = mats[0].shape[-1]
    eye = torch.eye(T, dtype=mats[0].dtype).expand(1, T, T)
    mats = [m + eye for m in mats]
    mats = [m / m.sum(dim=-1, keepdim=True) for m in mats]
    joint = mats[0]
    for m in mats[1:]:
        joint = m.bmm(joint)
    return joint[:, 0, model.num_prefix_tokens:]


# ----------------------------------------------------------------------------------------- layers_ours.py (port)
def safe_divide(a, b):
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def forward_hook(self, input, output):
    if type(input[0]) in (list, tuple):
        self.X = []
        for i in input[0]:
            x = i.detach()
            x.requires_grad = True
            self.X.append(x)
    else:
        self.X = input[0].detach()
        self.X.requires_grad = True
    self.Y = output


class RelProp(nn.Module):
    def __init__(self):
        super(RelProp, self).__init__()
        self.register_forward_hook(forward_hook)

    def gradprop(self, Z, X, S):
        C = torch.autograd.grad(Z, X, S, retain_graph=True)
        return C

    def relprop(self, R, alpha):
        return R


class RelPropSimple(RelProp):
    def relprop(self, R, alpha):
        Z = self.forward(self.X)
        S = safe_divide(R, Z)
        C = self.gradprop(Z, self.X, S)
        if torch.is_tensor(self.X) == False:  # noqa: E712 (literal)
            outputs = []
            outputs.append(self.X[0] * C[0])
            outputs.append(self.X[1] * C[1])
        else:
            outputs = self.X * (C[0])
        return outputs


class GELU(nn.GELU, RelProp):
    pass


class Softmax(nn.Softmax, RelProp):
    pass


class LayerNorm(nn.LayerNorm, RelProp):
    pass


class Dropout(nn.Dropout, RelProp):
    pass


class Add(RelPropSimple):
    def forward(self, inputs):
        return torch.add(*inputs)

    def relprop(self, R, alpha):
        Z = self.forward(self.X)
        S = safe_divide(R, Z)
        C = self.gradprop(Z, self.X, S)
        a = self.X[0] * C[0]
        b = self.X[1] * C[1]
        a_sum = a.sum()
        b_sum = b.sum()
        a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
        b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
        a = a * safe_divide(a_fact, a.sum())
        b = b * safe_divide(b_fact, b.sum())
        return [a, b]


class einsum(RelPropSimple):
    def __init__(self, equation):
        super().__init__()
        self.equation = equation

    def forward(self, *operands):
        return torch.einsum(self.equation, *operands)


class IndexSelect(RelProp):
    def forward(self, inputs, dim, indices):
        self.__setattr__('dim', dim)
        self.__setattr__('indices', indices)
        return torch.index_select(inputs, dim, indices)

    def relprop(self, R, alpha):
        Z = self.forward(self.X, self.dim, self.indices)
        S = safe_divide(R, Z)
        C = self.gradprop(Z, self.X, S)
        if torch.is_tensor(self.X) == False:  # noqa: E712 (literal)
            outputs = []
            outputs.append(self.X[0] * C[0])
            outputs.append(self.X[1] * C[1])
        else:
            outputs = self.X * (C[0])
        return outputs


class Clone(RelProp):
    def forward(self, input, num):
        self.__setattr__('num', num)
        outputs = []
        for _ in range(num):
            outputs.append(input)
        return outputs

    def relprop(self, R, alpha):
        Z = []
        for _ in range(self.num):
            Z.append(self.X)
        S = [safe_divide(r, z) for r, z in zip(R, Z)]
        C = self.gradprop(Z, self.X, S)[0]
        R = self.X * C
        return R


class Linear(nn.Linear, RelProp):
    def relprop(self, R, alpha):
        beta = alpha - 1
        pw = torch.clamp(self.weight, min=0)
        nw = torch.clamp(self.weight, max=0)
        px = torch.clamp(self.X, min=0)
        nx = torch.clamp(self.X, max=0)

        def f(w1, w2, x1, x2):
            Z1 = F.linear(x1, w1)
            Z2 = F.linear(x2, w2)
            S1 = safe_divide(R, Z1 + Z2)
            S2 = safe_divide(R, Z1 + Z2)
            C1 = x1 * torch.autograd.grad(Z1, x1, S1)[0]
            C2 = x2 * torch.autograd.grad(Z2, x2, S2)[0]
            return C1 + C2

        activator_relevances = f(pw, nw, px, nx)
        inhibitor_relevances = f(nw, pw, px, nx)
        R = alpha * activator_relevances - beta * inhibitor_relevances
        return R


class Conv2d(nn.Conv2d, RelProp):  # forward only: the "grad" method never relprops the patch embedding
    pass


class LayerScale(RelProp):  # ext: timm LayerScale, identity relprop
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Half(RelProp):  # ext: the "/ 2" of the distilled head, identity relprop
    def forward(self, x):
        return x / 2


# ----------------------------------------------------------------------------------------- ViT_LRP.py (port)
def compute_rollout_attention(all_layer_matrices, start_layer=0):
    num_tokens = all_layer_matrices[0].shape[1]
    batch_size = all_layer_matrices[0].shape[0]
    eye = torch.eye(num_tokens).expand(batch_size, num_tokens, num_tokens).to(all_layer_matrices[0].device)
    all_layer_matrices = [all_layer_matrices[i] + eye for i in range(len(all_layer_matrices))]
    joint_attention = all_layer_matrices[start_layer]
    for i in range(start_layer + 1, len(all_layer_matrices)):
        joint_attention = all_layer_matrices[i].bmm(joint_attention)
    return joint_attention


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = GELU()
        self.fc2 = Linear(hidden_features, out_features)
        self.drop = Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x

    def relprop(self, cam, **kwargs):
        cam = self.drop.relprop(cam, **kwargs)
        cam = self.fc2.relprop(cam, **kwargs)
        cam = self.act.relprop(cam, **kwargs)
        cam = self.fc1.relprop(cam, **kwargs)
        return cam


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0., qk_norm_eps=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.matmul1 = einsum('bhid,bhjd->bhij')
        self.matmul2 = einsum('bhij,bhjd->bhid')
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)
        self.softmax = Softmax(dim=-1)
        # ext: timm's q_norm / k_norm (LayerNorm: identity relprop)
        self.q_norm = LayerNorm(head_dim, eps=qk_norm_eps) if qk_norm_eps else None
        self.k_norm = LayerNorm(head_dim, eps=qk_norm_eps) if qk_norm_eps else None
        self.attn_cam = None
        self.attn = None
        self.v = None
        self.v_cam = None
        self.attn_gradients = None

    def save_attn(self, attn):
        self.attn = attn

    def save_attn_cam(self, cam):
        self.attn_cam = cam

    def get_attn_cam(self):
        return self.attn_cam

    def save_v(self, v):
        self.v = v

    def save_v_cam(self, cam):
        self.v_cam = cam

    def save_attn_gradients(self, attn_gradients):
        self.attn_gradients = attn_gradients

    def get_attn_gradients(self):
        return self.attn_gradients

    def forward(self, x):
        b, n, _, h = *x.shape, self.num_heads
        qkv = self.qkv(x)
        # rearrange(qkv, 'b n (qkv h d) -> qkv b h n d', qkv=3, h=h)
        q, k, v = qkv.reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:  # ext
            q, k = self.q_norm(q), self.k_norm(k)
        self.save_v(v)
        dots = self.matmul1([q, k]) * self.scale
        attn = self.softmax(dots)
        attn = self.attn_drop(attn)
        self.save_attn(attn)
        attn.register_hook(self.save_attn_gradients)
        out = self.matmul2([attn, v])
        out = out.permute(0, 2, 1, 3).reshape(b, n, -1)  # rearrange(out, 'b h n d -> b n (h d)')
        out = self.proj(out)
        out = self.proj_drop(out)
        return out

    def relprop(self, cam, **kwargs):
        cam = self.proj_drop.relprop(cam, **kwargs)
        cam = self.proj.relprop(cam, **kwargs)
        b, n, _ = cam.shape
        cam = cam.reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)  # 'b n (h d) -> b h n d'
        (cam1, cam_v) = self.matmul2.relprop(cam, **kwargs)
        cam1 /= 2
        cam_v /= 2
        self.save_v_cam(cam_v)
        self.save_attn_cam(cam1)
        cam1 = self.attn_drop.relprop(cam1, **kwargs)
        cam1 = self.softmax.relprop(cam1, **kwargs)
        (cam_q, cam_k) = self.matmul1.relprop(cam1, **kwargs)
        cam_q /= 2
        cam_k /= 2
        if self.q_norm is not None:  # ext
            cam_q, cam_k = self.q_norm.relprop(cam_q, **kwargs), self.k_norm.relprop(cam_k, **kwargs)
        # rearrange([cam_q, cam_k, cam_v], 'qkv b h n d -> b n (qkv h d)', qkv=3, h=self.num_heads)
        cam_qkv = torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(b, n, -1)
        return self.qkv.relprop(cam_qkv, **kwargs)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, drop=0., attn_drop=0., qk_norm_eps=None,
                 layerscale=False):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              qk_norm_eps=qk_norm_eps)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, drop=drop)
        self.add1 = Add()
        self.add2 = Add()
        self.clone1 = Clone()
        self.clone2 = Clone()
        self.ls1 = LayerScale(dim) if layerscale else None  # ext
        self.ls2 = LayerScale(dim) if layerscale else None

    def forward(self, x):
        x1, x2 = self.clone1(x, 2)
        a = self.attn(self.norm1(x2))
        x = self.add1([x1, self.ls1(a) if self.ls1 is not None else a])
        x1, x2 = self.clone2(x, 2)
        m = self.mlp(self.norm2(x2))
        x = self.add2([x1, self.ls2(m) if self.ls2 is not None else m])
        return x

    def relprop(self, cam, **kwargs):
        (cam1, cam2) = self.add2.relprop(cam, **kwargs)
        if self.ls2 is not None:
            cam2 = self.ls2.relprop(cam2, **kwargs)
        cam2 = self.mlp.relprop(cam2, **kwargs)
        cam2 = self.norm2.relprop(cam2, **kwargs)
        cam = self.clone2.relprop((cam1, cam2), **kwargs)
        (cam1, cam2) = self.add1.relprop(cam, **kwargs)
        if self.ls1 is not None:
            cam2 = self.ls1.relprop(cam2, **kwargs)
        cam2 = self.attn.relprop(cam2, **kwargs)
        cam2 = self.norm1.relprop(cam2, **kwargs)
        cam = self.clone1.relprop((cam1, cam2), **kwargs)
        return cam


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size[1] // patch_size[1]) * (img_size[0] // patch_size[0])
        self.proj = Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size, patch_size, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                 num_prefix=1, qk_norm_eps=None, layerscale=False, distilled=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  qk_norm_eps=qk_norm_eps, layerscale=layerscale)
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim)  # eps 1e-5 as in ViT_LRP; the fixture sets it to the timm model's
        self.head = Linear(embed_dim, num_classes)
        self.pool = IndexSelect()
        self.add = Add()
        self.num_prefix = num_prefix  # ext
        self.distilled = distilled  # ext: DeiT distillation head
        if distilled:
            self.head_dist = Linear(embed_dim, num_classes)
            self.pool_dist = IndexSelect()
            self.clone_head = Clone()
            self.halve, self.halve_dist = Half(), Half()
            self.add_head = Add()

    def forward(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = self.add([x, self.pos_embed])
        return self.forward_tokens(x)

    def forward_tokens(self, x):  # ext: entry with the embedding computed by the timm model
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.distilled:
            xa, xb = self.clone_head(x, 2)
            x0 = self.pool(xa, dim=1, indices=torch.tensor(0, device=x.device)).squeeze(1)
            x1 = self.pool_dist(xb, dim=1, indices=torch.tensor(1, device=x.device)).squeeze(1)
            return self.add_head([self.halve(self.head(x0)), self.halve_dist(self.head_dist(x1))])
        x = self.pool(x, dim=1, indices=torch.tensor(0, device=x.device))
        x = x.squeeze(1)
        x = self.head(x)
        return x

    def relprop(self, cam=None, method="grad", is_ablation=False, start_layer=0, **kwargs):
        if self.distilled:  # ext
            (ca, cb) = self.add_head.relprop(cam, **kwargs)
            ca = self.head.relprop(self.halve.relprop(ca, **kwargs), **kwargs)
            cb = self.head_dist.relprop(self.halve_dist.relprop(cb, **kwargs), **kwargs)
            ca = self.pool.relprop(ca.unsqueeze(1), **kwargs)
            cb = self.pool_dist.relprop(cb.unsqueeze(1), **kwargs)
            cam = self.clone_head.relprop((ca, cb), **kwargs)
        else:
            cam = self.head.relprop(cam, **kwargs)
            cam = cam.unsqueeze(1)
            cam = self.pool.relprop(cam, **kwargs)
        cam = self.norm.relprop(cam, **kwargs)
        self.block_input_sums = []  # ext: for the conservation check
        for blk in reversed(self.blocks):
            cam = blk.relprop(cam, **kwargs)
            self.block_input_sums.append(cam.sum().item())
        assert method == "grad"
        cams = []
        for blk in self.blocks:
            grad = blk.attn.get_attn_gradients()
            cam = blk.attn.get_attn_cam()
            cam = cam[0].reshape(-1, cam.shape[-1], cam.shape[-1])
            grad = grad[0].reshape(-1, grad.shape[-1], grad.shape[-1])
            cam = grad * cam
            cam = cam.clamp(min=0).mean(dim=0)
            cams.append(cam.unsqueeze(0))
        rollout = compute_rollout_attention(cams, start_layer=start_layer)
        cam = rollout[:, 0, self.num_prefix:]  # ext: [:, 0, 1:] for P prefix tokens
        return cam


def generate_LRP(model, input, index=None, start_layer=0, tokens=False):
    """ViT_explanation_generator.LRP.generate_LRP (batch 1), method "grad"."""
    output = model.forward_tokens(input) if tokens else model(input)
    kwargs = {"alpha": 1}
    if index is None:
        index = output.argmax(-1).item()
    one_hot = torch.zeros((1, output.size()[-1]), dtype=torch.float32)
    one_hot[0, index] = 1
    one_hot_vector = one_hot
    one_hot = one_hot.clone().requires_grad_(True)
    one_hot = torch.sum(one_hot * output)
    model.zero_grad()
    one_hot.backward(retain_graph=True)
    return model.relprop(one_hot_vector.clone(), method="grad", start_layer=start_layer, **kwargs)


def port_from_timm(model):
    """Build the ported ViT_LRP model with the timm model's weights (final norm eps set to the timm model's)."""
    b0 = model.blocks[0]
    qk_eps = b0.attn.q_norm.eps if isinstance(b0.attn.q_norm, nn.LayerNorm) else None
    port = VisionTransformer(
        img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size, num_classes=model.num_classes,
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=b0.attn.num_heads,
        mlp_ratio=b0.mlp.fc1.out_features / model.embed_dim, qkv_bias=b0.attn.qkv.bias is not None,
        num_prefix=model.num_prefix_tokens, qk_norm_eps=qk_eps, layerscale=not isinstance(b0.ls1, nn.Identity),
        distilled=hasattr(model, "head_dist"))
    port.norm.eps = model.norm.eps
    with torch.no_grad():
        port.patch_embed.proj.weight.copy_(model.patch_embed.proj.weight)
        port.patch_embed.proj.bias.copy_(model.patch_embed.proj.bias)
        if model.pos_embed.shape[1] == port.pos_embed.shape[1]:
            port.pos_embed.copy_(model.pos_embed)
        port.cls_token.copy_(model.cls_token)
        for pb, tb in zip(port.blocks, model.blocks):
            pairs = [(pb.norm1, tb.norm1), (pb.norm2, tb.norm2), (pb.attn.qkv, tb.attn.qkv),
                     (pb.attn.proj, tb.attn.proj), (pb.mlp.fc1, tb.mlp.fc1), (pb.mlp.fc2, tb.mlp.fc2)]
            if qk_eps:
                pairs += [(pb.attn.q_norm, tb.attn.q_norm), (pb.attn.k_norm, tb.attn.k_norm)]
            for p, t in pairs:
                p.weight.copy_(t.weight)
                if p.bias is not None:
                    p.bias.copy_(t.bias)
            if pb.ls1 is not None:
                pb.ls1.gamma.copy_(tb.ls1.gamma)
                pb.ls2.gamma.copy_(tb.ls2.gamma)
        port.norm.weight.copy_(model.norm.weight)
        port.norm.bias.copy_(model.norm.bias)
        for name in ("head",) + (("head_dist",) if port.distilled else ()):
            getattr(port, name).weight.copy_(getattr(model, name).weight)
            getattr(port, name).bias.copy_(getattr(model, name).bias)
    return port.to(next(model.parameters()).dtype).eval()


def port_map(model, port, image, target, start_layer):
    """ViT_LRP map for one image (1, C, H, W); the literal embedding for the plain layout, timm's otherwise."""
    literal_embed = model.num_prefix_tokens == 1 and not getattr(model, "no_embed_class", False)
    if literal_embed:
        cam = generate_LRP(port, image, index=target, start_layer=start_layer)
    else:
        with torch.no_grad():
            tokens = model.norm_pre(model._pos_embed(model.patch_embed(image)))
        cam = generate_LRP(port, tokens, index=target, start_layer=start_layer, tokens=True)
    return cam.detach()
