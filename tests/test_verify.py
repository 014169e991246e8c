"""The θ = 0 check sees every broken rewrite: node by node, where the change first appears, against each
node's own float noise, so a zero or tiny head that hides the change from the output does not hide it."""

import pytest
import torch

import morphir
from conftest import build_graph
from lookalikes import LOOKALIKES
from models import EXTRA_MODELS
from morphir.passes import Deepen, Split
from morphir.verify import NOISE_FACTOR, find_mismatch, noise_profile


class OffSplit(Split):
    """A split whose second copy reads 1.19 times the channel's incoming weights: it changes what the
    group's consumers compute by about 10 % of the channel's share."""

    name = "off_split"

    def sites(self, graph):  # linear groups too: a broken rewrite there changes the function all the same
        for grp in graph.groups:
            if grp.growable and grp.consumers:
                yield from (morphir.Site(grp.name, c) for c in range(grp.width))

    def rewrite(self, rw, items):
        for site, theta in items:
            w = rw.graph.unflatten_incoming(site.anchor, rw.graph.incoming_weights(site.anchor, site.index))
            off = {k: 0.19 * v for k, v in w.items()}
            rw.set_copies(site.anchor, site.index, [morphir.ChannelCopy(None, 0.5), morphir.ChannelCopy(off, 0.5)],
                          origin=f"off_split@{site}")
        return bool(items)


class OffDeepen(Deepen):
    """A deepen whose inserted layer is not the identity at θ = 0."""

    name = "off_deepen"

    def rewrite(self, rw, items):
        changed = super().rewrite(rw, items)
        for ins in rw._inserts:
            for _, module in ins.modules:
                if getattr(module, "weight", None) is not None and module.weight.dim() > 1:
                    with torch.no_grad():
                        module.weight.add_(0.05)
        return changed


def _graph(name: str) -> morphir.MorphGraph:
    if name in LOOKALIKES:
        ctor, shape = LOOKALIKES[name]
        torch.manual_seed(0)
        return morphir.trace(ctor(), torch.randn(2, *shape))
    return build_graph(name)


def _live_channel(g: morphir.MorphGraph, group: str) -> int:
    """The channel of ``group`` that its consumers read the most of on the probe batch (a dead channel,
    zero after its ReLU on every probe sample, cannot show any rewrite of itself)."""
    grp = g.group(group)
    seen = {}
    hooks = [g.submodule(c.module).register_forward_pre_hook(lambda m, a, c=c: seen.setdefault(c.module, a[0]))
             for c in grp.consumers]
    try:
        g.run_probe(g.probe_inputs)
    finally:
        for h in hooks:
            h.remove()
    score = torch.zeros(grp.width)
    for c in grp.consumers:
        x, lay = seen[c.module], g.analysis.consumer_layouts[c.module]
        feats = x.movedim(lay.axis, 0).reshape(x.shape[lay.axis], -1).abs().amax(1)
        start = c.segment.offset
        score += feats[start:start + grp.width * c.segment.inner].reshape(grp.width, -1).amax(1)
    return int(score.argmax())


def _reads_nothing(g: morphir.MorphGraph, group: str, channel: int) -> bool:
    """Every consumer of the group has zero weights on the channel: nothing downstream can change."""
    return not bool(torch.any(g.outgoing_weights(group, channel) != 0))


# tiny_head_biased has its own test below; sdp_attention has no growable group (test_fidelity says why)
BROKEN_ON = ["zoo:" + n for n in morphir.zoo.names()] + list(EXTRA_MODELS) + \
    [n for n in LOOKALIKES if n not in ("tiny_head_biased", "sdp_attention")]


@pytest.mark.parametrize("name", BROKEN_ON)
def test_a_broken_split_is_caught_wherever_it_changes_something(name: str) -> None:
    g = _graph(name)
    before = {k: v.clone() for k, v in g.module.state_dict().items()}
    broken = OffSplit()
    cands = morphir.candidates(g, broken)
    anchors = list(dict.fromkeys(c.site.anchor for c in cands))
    anchors = anchors[:: max(1, len(anchors) // 6)]  # six groups spread over the net, first to last
    live = {a: _live_channel(g, a) for a in anchors}
    sites = {c.site.anchor: c for c in cands if c.site.index == live.get(c.site.anchor)}
    assert sites, name
    caught = 0
    for anchor, cand in sites.items():
        if _reads_nothing(g, anchor, cand.site.index):  # a zero head reads the group: the rewrite changes nothing at all
            morphir.apply(g, [cand])
            continue
        with pytest.raises(morphir.PreservationError) as info:
            morphir.apply(g, [cand])
        text = str(info.value)
        assert "'off_split'" in text and str(cand.site) in text and "node" in text, text
        consumers = {c.node for c in g.group(anchor).consumers}
        assert any(f"node {n!r}" in text for n in consumers), (text, consumers)  # where it first appears
        caught += 1
    assert caught >= 1
    assert all(torch.equal(before[k], v) for k, v in g.module.state_dict().items())


@pytest.mark.parametrize("name", ["zero_head", "tiny_head", "vit_zero_head"])
def test_the_network_output_alone_would_have_missed_it(name: str) -> None:
    g = _graph(name)
    cand = next(c for c in morphir.candidates(g, OffSplit()) if c.site.anchor != "hidden")
    broken = morphir.apply(g, [cand], verify=False)
    err, tol = morphir.output_mismatch(g, broken)  # the old check: the output, with a floor of 1e-5
    assert err <= tol
    found = find_mismatch(g, broken, edited={cand.site.anchor})
    assert found is not None and found.error > 100 * found.tolerance


def test_a_broken_deepen_is_caught_at_the_users_of_its_anchor() -> None:
    g = _graph("tiny_head")
    good = morphir.candidates(g, "deepen")
    assert morphir.apply(g, good).num_params() > g.num_params()
    bad = morphir.candidates(g, OffDeepen())
    with pytest.raises(morphir.PreservationError, match="'off_deepen'"):
        morphir.apply(g, bad[:1])


def test_below_float_resolution_is_not_a_change() -> None:
    # a 1e-7 head with a bias of 0.5: a broken split of the layer it reads moves its output by ~1e-8,
    # below float32's rounding of 0.5 (3e-8); the interior groups are still caught where they change
    g = _graph("tiny_head_biased")
    broken = OffSplit()
    hidden = next(c for c in morphir.candidates(g, broken) if c.site.anchor == "hidden")
    grown = morphir.apply(g, [hidden])
    err, _ = morphir.output_mismatch(g, grown)
    assert err < 1e-7
    for cand in [c for c in morphir.candidates(g, broken) if c.site.anchor != "hidden"][:2]:
        with pytest.raises(morphir.PreservationError):
            morphir.apply(g, [cand])


def test_tolerance_is_each_nodes_float_noise_and_exact_rewrites_sit_far_below_it() -> None:
    g = build_graph("zoo:resnet20")
    profile = noise_profile(g)
    out = g.run_probe()
    # the output's noise is about float32's rounding of it, not an absolute floor
    assert 0 < profile["output"] < 1e-4 * float(out.abs().max())
    cands = morphir.candidates(g, "split")
    grown = morphir.apply(g, cands, verify=False)
    # every shared node within a few times its noise (the tolerance allows NOISE_FACTOR times)
    import morphir.verify as verify

    old = verify.NOISE_FACTOR
    try:
        verify.NOISE_FACTOR = NOISE_FACTOR / 10
        assert find_mismatch(g, grown, edited={c.site.anchor for c in cands}) is None
    finally:
        verify.NOISE_FACTOR = old
    assert noise_profile(g) is profile  # cached until the graph changes
    g.invalidate()
    assert noise_profile(g) is not profile


def test_several_candidates_blame_the_broken_one() -> None:
    g = _graph("tiny_head")
    good = morphir.candidates(g, "split")[:6]
    bad = [c for c in morphir.candidates(g, OffSplit()) if c.site.anchor == "features.3"][2]
    with pytest.raises(morphir.PreservationError) as info:
        morphir.apply(g, good + [bad])
    assert f"'off_split' at site {bad.site}" in str(info.value)


def test_a_rewrite_that_changes_another_group_is_caught() -> None:
    class Meddler(Split):
        name = "meddler"

        def rewrite(self, rw, items):
            super().rewrite(rw, items)
            other = next(g.name for g in rw.graph.groups if g.growable and g.name != items[0][0].anchor)
            w = rw.graph.unflatten_incoming(other, rw.graph.incoming_weights(other, 0))
            rw.perturb(other, 0, {k: 0.3 * v for k, v in w.items()}, origin="meddler")
            return True

    g = _graph("zero_head")
    with pytest.raises(morphir.PreservationError, match="'meddler'"):
        morphir.apply(g, morphir.candidates(g, Meddler())[:1])
