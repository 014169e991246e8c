"""Split copies at fresh norms: the function is unchanged, only how fast the copies learn."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import morphir
from growing import loaders, small_net
from morphir.passes import Split
from morphir.passes.split import FRESH_NORM
from morphir.rewriter import Rewriter, batch_norm_after
from morphir.train import train_epoch


def _trained_like() -> morphir.MorphGraph:
    """The small net with real batch-norm statistics and its first conv at 4× its norm, as training
    leaves weights (the batch norm's statistics follow, so the function is the unscaled one's)."""
    model = small_net()
    with torch.no_grad():
        model.train()
        for _ in range(20):
            model(torch.randn(64, 1, 8, 8))
        conv, bn = model[0], model[1]
        conv.weight.mul_(4.0), conv.bias.mul_(4.0)
        bn.running_mean.mul_(4.0), bn.running_var.mul_(16.0)
    return morphir.trace(model.eval(), torch.randn(2, 1, 8, 8))


def _incoming_norms(g: morphir.MorphGraph, group: str) -> torch.Tensor:
    return torch.stack([g.incoming_weights(group, c).norm() for c in range(g.group(group).width)])


def test_copies_get_the_fresh_norms_and_the_function_is_unchanged() -> None:
    g = _trained_like()
    group = "0"
    assert batch_norm_after(g, group) == "1"
    split = [c for c in morphir.candidates(g, "split") if c.site.anchor == group and c.site.index == 3]
    old = float(g.incoming_weights(group, 3).norm())
    s1, s2 = Split().copy_scales(g, split[0].site)
    assert (s1, s2) == pytest.approx((FRESH_NORM / old, 0.5 * FRESH_NORM / old))
    g2 = morphir.apply(g, split)  # the engine checks preservation at θ = 0
    norms = _incoming_norms(g2, group)
    assert g2.group(group).width == 7
    # the original's slot holds the first copy, at the fresh norm; the new channel at the end the second, at half
    assert [float(norms[3]), float(norms[-1])] == pytest.approx([FRESH_NORM, 0.5 * FRESH_NORM], rel=1e-5)
    assert torch.equal(norms[:3], _incoming_norms(g, group)[:3])  # other channels untouched
    x = torch.randn(32, 1, 8, 8)
    g.module.eval(), g2.module.eval()
    assert torch.allclose(g.module(x), g2.module(x), atol=1e-5)
    g.module.train(), g2.module.train()  # batch statistics: the same up to the batch norm's ε
    assert torch.allclose(g.module(x), g2.module(x), atol=1e-3)


def test_rescaled_copies_compute_what_plain_copies_compute_for_any_theta() -> None:
    g = _trained_like()
    group = "0"
    plain, fresh = Split(fresh_norm=None), Split()
    theta = torch.randn(g.incoming_numel(group), generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (plain, fresh):
        cands = [c for c in m.candidates(g) if c.site.anchor == group and c.site.index in (2, 4)]
        outs.append(morphir.rewrite(g, cands, {c: theta for c in cands}).graph.module.eval())
    x = torch.randn(16, 1, 8, 8)
    assert torch.allclose(outs[0](x), outs[1](x), atol=1e-4)
    assert not torch.allclose(outs[0](x), g.module.eval()(x), atol=1e-3)  # θ did change the function


def test_groups_without_a_batch_norm_keep_plain_copies() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    with torch.no_grad():
        mlp[1].weight.mul_(5.0)
    g = morphir.trace(mlp, torch.randn(1, 1, 8, 8))
    group = next(grp.name for grp in g.groups if grp.growable)
    assert batch_norm_after(g, group) is None
    split = [c for c in morphir.candidates(g, "split") if c.site.anchor == group][:1]
    assert Split().copy_scales(g, split[0].site) == (1.0, 1.0)
    g2 = morphir.apply(g, split)
    assert torch.equal(g2.incoming_weights(group, 0), g.incoming_weights(group, 0))
    assert torch.equal(g2.incoming_weights(group, 12), g.incoming_weights(group, 0))
    with pytest.raises(morphir.MorphismError, match="batch norm directly follows"):
        Rewriter(g).split(group, 0, scales=(0.5, 0.5))


@pytest.mark.parametrize("kwargs", [dict(fresh_norm=0.0), dict(fresh_norm=-1.0), dict(ratio=0.0), dict(ratio=1.5)])
def test_bad_fresh_norms_are_refused(kwargs) -> None:
    with pytest.raises(morphir.MorphismError, match="fresh_norm|ratio"):
        Split(**kwargs)


def test_a_copy_of_a_copy_is_halved_again() -> None:
    g = _trained_like()
    cand = next(c for c in morphir.candidates(g, "split") if c.site.anchor == "0" and c.site.index == 3)
    g2 = morphir.apply(g, [cand])
    again = next(c for c in morphir.candidates(g2, "split") if c.site.anchor == "0" and c.site.index == 6)
    assert float(g2.incoming_weights("0", 6).norm()) == pytest.approx(0.5 * FRESH_NORM, rel=1e-5)
    assert Split().copy_scales(g2, again.site) == pytest.approx((1.0, 0.5))  # never scaled up; the ratio still applies


def _copies_cosine_after_training(split: Split) -> float:
    """Train the small net, split channel 0 of its first group (θ = 0), train on; the copies'
    incoming weights' cosine."""
    train, _ = loaders()
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        train_epoch(model, opt, train, F.cross_entropy)
    g = morphir.trace(model, torch.randn(2, 1, 8, 8))
    group = next(grp.name for grp in g.groups if grp.growable)
    cand = next(c for c in split.candidates(g) if c.site.anchor == group and c.site.index == 0)
    module = morphir.apply(g, [cand]).module
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(2):
        train_epoch(module, opt, train, F.cross_entropy)
    w = module.get_submodule(g.group(group).producers[0].module).weight.detach().flatten(1)
    return float(F.cosine_similarity(w[0], w[-1], dim=0))


def test_rescaled_copies_drift_apart_in_training_and_plain_copies_do_not() -> None:
    plain = _copies_cosine_after_training(Split(fresh_norm=None))
    fresh = _copies_cosine_after_training(Split())
    assert plain > 0.9999  # identical copies get identical gradients
    assert fresh < 0.99
