"""Full-size model builders shared by the codegen benchmarks (bench_codegen, profile_kernels):
a ResNet-50-shaped and a MobileNetV2-shaped CNN (torchvision's layer plan, ``width`` scales the
channels) and transformers' BERT at BERT-base's config by default, all at batch 1, plus the
seeding and MAC count the benchmarks use. Random weights: latency does not depend on them."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin, cout, k=3, s=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())  # fmt: skip


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))  # fmt: skip
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())  # fmt: skip

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet(width=1.0, blocks=(3, 4, 6, 3), res=224):
    w = lambda c: max(4, int(c * width))
    layers, cin = [conv_bn(3, w(64), 7, 2), nn.MaxPool2d(3, 2, 1)], w(64)
    for i, n in enumerate(blocks):
        mid = w(64 * 2**i)
        for j in range(n):
            layers.append(Bottleneck(cin, mid, mid * 4, 2 if j == 0 and i > 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers), (torch.randn(1, 3, res, res),)


class InvRes(nn.Module):
    def __init__(self, cin, cout, s, t):
        super().__init__()
        mid = cin * t
        self.use_res = s == 1 and cin == cout
        self.body = nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, s, groups=mid),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x):
        return x + self.body(x) if self.use_res else self.body(x)


def mobilenet(width=1.0, res=224):
    w = lambda c: max(4, int(c * width))
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip
    layers, cin = [conv_bn(3, w(32), 3, 2)], w(32)
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvRes(cin, w(c), s if i == 0 else 1, t))
            cin = w(c)
    layers += [conv_bn(cin, w(1280), 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(w(1280), 1000)]  # fmt: skip
    return nn.Sequential(*layers), (torch.randn(1, 3, res, res),)


def bert(width=1.0, layers=12, seq=128, d=768, heads=12):
    """transformers' ``BertModel`` (random weights) at BERT-base's config by default, wrapped to
    take ``(input_ids, attention_mask)`` and return ``(last_hidden_state, pooler_output)``."""
    from graphprune.models.hf import TensorOutputs
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=int(4 * d * width), attn_implementation="sdpa")  # fmt: skip
    model = TensorOutputs(BertModel(cfg).eval(), ("input_ids", "attention_mask"),
                          ("last_hidden_state", "pooler_output"))  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (1, seq), dtype=torch.int64)
    return model.eval(), (ids, torch.ones(1, seq, dtype=torch.int64))


def macs(model, inputs) -> int:
    """conv/linear MACs of one forward (hooks); transformers' Linear layers are nn.Linear."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(*inputs)
    for h in hs:
        h.remove()
    return total


def seeded(factory, width):
    """The model with deterministic weights and BN statistics measured on its example input:
    with default init and made-up statistics the activations of the deep CNNs shrank ~3x per
    layer (MobileNetV2's features were ~1e-8, its output the Linear bias), so the max abs err
    column compared a bias with itself."""
    torch.manual_seed(0)
    model, inputs = factory(width)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns:
        model.train()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics exactly
        with torch.no_grad():
            model(*inputs)
    model.eval()
    return model, inputs


def variant_of(model, inputs, variant):
    """``(model, compile kwargs)`` for a variant of the dense ``model``."""
    from graphprune.models.hf import TensorOutputs

    import graphprune as gp

    if variant == "dense":
        return model, {}
    # gp.prune needs batch >= 2 (batch 1 makes torch.export specialise); the module form it
    # returns runs at any batch.
    calib = tuple(torch.cat([x, x]) for x in inputs)
    if variant == "50% pruned":
        if isinstance(model, TensorOutputs):  # prune the BertModel: uniform, config-expressible
            res = gp.prune(model.model, calib, ratio=0.5, criterion="l2")
            pruned = TensorOutputs(res.model.eval(), model.input_names, model.output_names)
        else:
            res = gp.prune(model, calib, ratio=0.5, criterion="l2")
            pruned = res.model
        if res.report.form != "module":
            raise RuntimeError(f"pruned form {res.report.form!r} is specialised to batch 2")
        return pruned.eval(), {}
    if variant in ("90% unstr.", "2:4"):
        if variant == "2:4":
            res = gp.sparsify(model, inputs, pattern="2:4")
        else:
            res = gp.sparsify(model, inputs, sparsity=0.9, pattern="unstructured")
        kw = {"kernels": "auto"}
        if res.graph is not None:  # the masks on the IR name each layer's pattern
            kw["graph"] = res.graph
        return res.model.eval(), kw
    raise ValueError(variant)
