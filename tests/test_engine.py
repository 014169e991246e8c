"""The engine: θ handling, verification, honest 'modified', metadata, and prune folding."""

import copy

import pytest
import torch
import torch.nn as nn

import morphir
from morphir.passes import Split


def mlp() -> morphir.MorphGraph:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    return morphir.trace(net, torch.randn(4, 5))


class SloppySplit(Split):
    """Halves one copy's outgoing weights but not the other's: not function-preserving."""

    name = "sloppy"

    def rewrite(self, rw, items):
        for site, theta in items:
            rw.set_copies(site.anchor, site.index, [morphir.ChannelCopy(None, 0.5), morphir.ChannelCopy(None, 0.6)],
                          origin=f"sloppy@{site}")
        return bool(items)


class SilentSplit(Split):
    """Changes the graph but claims it did not."""

    name = "silent"

    def rewrite(self, rw, items):
        super().rewrite(rw, items)
        return False


def test_preservation_error_names_morphism_and_site_and_leaves_graph_untouched() -> None:
    g = mlp()
    before = copy.deepcopy(g.module.state_dict())
    cands = morphir.candidates(g, SloppySplit())
    good = morphir.candidates(g, "split")
    with pytest.raises(morphir.PreservationError) as info:
        morphir.apply(g, good[6:11] + cands[3:4])  # the culprit is found among several candidates
    assert "'sloppy'" in str(info.value) and str(cands[3].site) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in g.module.state_dict().items())
    assert g.group("0").width == 6


def test_dishonest_modified_flag_is_caught() -> None:
    g = mlp()
    with pytest.raises(morphir.InvariantError, match="reported modified=False"):
        morphir.apply(g, morphir.candidates(g, SilentSplit())[:1])


def test_rewrite_reports_modified_honestly() -> None:
    g = mlp()
    prune = morphir.candidates(g, "prune")
    zero = {c: torch.zeros_like(c.morphism.default_theta(g, c.site)) for c in prune}
    assert morphir.rewrite(g, prune, zero).modified is False
    assert morphir.rewrite(g, prune[:1]).modified is True
    assert morphir.rewrite(g, []).modified is False


def test_theta_mapping_learned_and_shape_errors() -> None:
    g = mlp()
    c = morphir.candidates(g, "split")[0]
    shape = c.morphism.theta_shape(g, c.site)
    assert shape == torch.Size([5])
    theta = torch.full(shape, 0.3)
    by_map = morphir.apply(g, [c], {c: theta})
    c.theta = theta
    by_learned = morphir.apply(g, [c], "learned")
    x = torch.randn(9, 5)
    assert torch.equal(by_map.module(x), by_learned.module(x))
    w = by_map.submodule("0").weight
    assert torch.allclose(w[0], g.submodule("0").weight[0] + 0.3) and torch.allclose(w[6], g.submodule("0").weight[0] - 0.3)
    with pytest.raises(morphir.MorphismError, match="shape"):
        morphir.apply(g, [c], {c: torch.zeros(4)})
    c.theta = None
    with pytest.raises(morphir.MorphismError, match="no learned"):
        morphir.apply(g, [c], "learned")


def test_prune_removes_the_channel_and_folds_its_constant_exactly() -> None:
    g = mlp()
    c = [c for c in morphir.candidates(g, "prune") if c.site.anchor == "0"][2]
    pruned = morphir.apply(g, [c])
    assert pruned.submodule("0").out_features == 5 and pruned.submodule("2").in_features == 5
    assert g.num_params() - pruned.num_params() == -c.delta_params == 5 + 1 + 7
    # the reference: the same net with the channel's incoming weights zeroed (its output is relu(bias))
    ref = copy.deepcopy(g.module)
    with torch.no_grad():
        ref.get_submodule("0").weight[2] = 0
    x = torch.randn(16, 5)
    assert torch.allclose(pruned.module(x), ref(x), atol=1e-6)


def test_prune_never_empties_a_group() -> None:
    g = mlp()
    group0 = [c for c in morphir.candidates(g, "prune") if c.site.anchor == "0"]
    with pytest.raises(morphir.MorphismError, match="every channel"):
        morphir.apply(g, group0)
    assert morphir.apply(g, group0[1:]).group("0").width == 1


def test_conflicting_edits_of_one_channel_are_refused() -> None:
    g = mlp()
    s = morphir.candidates(g, "split")[0]
    p = [c for c in morphir.candidates(g, "prune") if c.site == s.site][0]
    with pytest.raises(morphir.MorphismError, match="both edit channel"):
        morphir.apply(g, [s, p])


def test_metadata_is_namespaced_and_invalidated_by_rewrites() -> None:
    g = mlp()
    node = g.node("_0")
    g.set_meta(node, "morphir.note", 1)
    assert g.is_valid("morphir.note")
    with pytest.raises(morphir.AnalysisError):
        g.set_meta(node, "note", 1)
    g2 = morphir.apply(g, morphir.candidates(g, "split")[:1])
    assert not g2.is_valid("morphir.note") and "morphir.note" not in g2.node("_0").meta
    assert g.node("_0").meta["morphir.note"] == 1  # the original keeps it


def test_apply_keeps_module_names_and_records_history_and_provenance() -> None:
    g = mlp()
    deepen = [c for c in morphir.candidates(g, "deepen") if c.site.variant == "residual"][:1]
    g2 = morphir.apply(g, morphir.candidates(g, "split")[:2] + deepen)
    names = {n for n, _ in g.module.named_modules()}
    assert names <= {n for n, _ in g2.module.named_modules()}
    assert g2.history == ("split@0[0]", "split@0[1]", f"deepen@{deepen[0].site}")
    created = [n for n in g2.module.graph.nodes if "morphir.created_by" in n.meta]
    assert len(created) == 4 and all(n.meta["morphir.created_by"].startswith("deepen@") for n in created)


def test_registries_are_owned_not_global() -> None:
    reg = morphir.default_registry().register(SloppySplit())
    assert "sloppy" in reg.names()
    assert "sloppy" not in morphir.morphisms()
    assert morphir.default_registry() is not morphir.default_registry()
    with pytest.raises(morphir.MorphismError, match="already registered"):
        reg.register(SloppySplit())
    with pytest.raises(morphir.MorphismError, match="unknown morphism"):
        morphir.candidates(mlp(), "nope")
    assert len(morphir.candidates(mlp(), "sloppy", registry=reg)) == 6 + 7  # both hidden layers


def test_not_growable_group_is_refused_with_reason() -> None:
    g = mlp()
    rw = morphir.Rewriter(g.copy())
    with pytest.raises(morphir.MorphismError, match="network output"):
        rw.split("4", 0)
