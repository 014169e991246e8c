"""Near-duplicate channels: split copies count, separated copies and distinct channels do not."""

import pytest
import torch

import morphir


def _graph() -> morphir.MorphGraph:
    torch.manual_seed(0)
    return morphir.trace(morphir.zoo.build("vgg19", (1, 8, 8), 10), torch.randn(1, 1, 8, 8))


def test_a_fresh_network_has_no_near_duplicates() -> None:
    g = _graph()
    counts = morphir.redundant_channels(g)
    assert set(counts) == {grp.name for grp in g.groups if grp.growable}
    assert sum(counts.values()) == 0


def test_split_copies_are_counted_in_pairs_and_separated_copies_are_not() -> None:
    g = _graph()
    group = next(grp.name for grp in g.groups if grp.growable)
    splits = [c for c in morphir.candidates(g, "split") if c.site.anchor == group and c.site.index in (1, 5)]
    # θ = 0: two exact copies of each split channel
    copies = morphir.apply(g, splits)
    assert morphir.redundant_channels(copies)[group] == 4
    # θ orthogonal to w with ‖θ‖ = ‖w‖: the copies w ± θ are orthogonal (cosine 0)
    thetas = {}
    for c in splits:
        w = g.incoming_weights(group, c.site.index)
        t = torch.randn(w.shape, generator=torch.Generator().manual_seed(c.site.index))
        t = t - (t @ w) / (w @ w) * w
        thetas[c] = t * (w.norm() / t.norm())
    apart = morphir.rewrite(g, splits, thetas).graph
    assert apart.group(group).width == g.group(group).width + 2
    assert morphir.redundant_channels(apart)[group] == 0
    # the threshold decides: at a cosine of -1 every channel of a group of two or more counts
    assert morphir.redundant_channels(apart, threshold=-1.0)[group] == apart.group(group).width


def test_linear_groups_are_measured_too() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12), torch.nn.ReLU(), torch.nn.Linear(12, 10))
    g = morphir.trace(mlp, torch.randn(1, 1, 8, 8))
    grp = next(grp for grp in g.groups if grp.growable)
    assert grp.width == 12
    split = next(c for c in morphir.candidates(g, "split") if c.site.anchor == grp.name)
    assert morphir.redundant_channels(morphir.apply(g, [split]))[grp.name] == 2


@pytest.mark.parametrize("threshold", [1.5, -2.0, float("nan")])
def test_a_threshold_outside_the_cosine_range_is_refused(threshold: float) -> None:
    with pytest.raises(morphir.MorphirError, match="cosine"):
        morphir.redundant_channels(_graph(), threshold=threshold)
