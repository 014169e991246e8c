"""MixtureGrowth (morphir.passes.mixture): template mixing, tiling, fusion, the grower in the loop."""

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import morphir
from morphir import data, zoo
from morphir.checkpoints import CHECKPOINT
from morphir.passes.mixture import MixtureGrowth, bake, mix, mixed_layers, widen

HIDDEN = ["features.1.0", "features.3.0", "features.9.0", "features.18.0"]


def seed_graph(seed: int = 0) -> morphir.MorphGraph:
    torch.manual_seed(seed)
    return morphir.trace(zoo.build("vgg19", (1, 8, 8), 10), torch.randn(1, 1, 8, 8))


def alpha(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original.detach()


def templates(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight[0].templates


def block(layer: nn.Module, i: int, j: int) -> torch.Tensor:
    """Block (i, j) of a mixed layer's weight (blocks have the templates' shape)."""
    o, n = templates(layer).shape[1:3]
    return layer.weight.detach()[i * o:(i + 1) * o, j * n:(j + 1) * n]


def mixed(coefs: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """Σₖ coefs[k] · temps[k], written out."""
    return sum(c * t for c, t in zip(coefs, temps.detach()))


def randomise_norms(graph: morphir.MorphGraph, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in graph.module.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3), (m.running_mean, -0.5, 0.5),
                                  (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)


# -- (1) template mixing -------------------------------------------------------------------------------
def test_a_mixed_layer_is_the_plain_layer_with_the_generated_weight_and_same_shape_neighbours_share_templates() -> None:
    g = seed_graph()
    m = mix(g, templates=3)
    layers = mixed_layers(m.module)
    # every conv and the classifier are mixed, under the seed's module names, with its biases kept
    assert list(layers) == ["features.0.0", *[f"features.{i}.0" for i in (1, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 15,
                                                                             16, 17, 18)], "classifier"]
    assert torch.equal(layers["classifier"].bias, g.submodule("classifier").bias)
    x = torch.randn(4, 16, 8, 8)
    for name in ("features.1.0", "features.18.0"):
        layer = layers[name]
        w = mixed(alpha(layer)[0, 0], templates(layer))
        assert w.shape == (16, 16, 3, 3)
        assert torch.allclose(layer(x), F.conv2d(x, w, None, padding=1), atol=1e-5)
    head = layers["classifier"]
    v = torch.randn(5, 16)
    assert torch.allclose(head(v), v @ mixed(alpha(head)[0, 0], templates(head)).T + head.bias, atol=1e-5)
    # one bank per run of adjacent same-shape layers: (16,1,3,3), 15 × (16,16,3,3), (10,16)
    banks = {id(templates(layer)) for layer in layers.values()}
    assert len(banks) == 3
    assert templates(layers["features.1.0"]) is templates(layers["features.18.0"])
    assert templates(layers["features.0.0"]) is not templates(layers["features.1.0"])
    expected = 3 * (16 * 9 + 16 * 16 * 9 + 10 * 16) + 17 * 3 + 10 + 16 * 2 * 16  # templates, α, bias, BN
    assert m.num_params() == expected < g.num_params()
    # shared for real: one template changed in place moves both layers' weights
    before = [layers[n].weight.detach().clone() for n in ("features.1.0", "features.18.0")]
    with torch.no_grad():
        templates(layers["features.1.0"])[0] += 1.0
    assert all(not torch.allclose(layers[n].weight, b) for n, b in zip(("features.1.0", "features.18.0"), before))
    # share=2: at most two layers per bank (8 banks for the 15 inner convs)
    assert len({id(templates(layer)) for layer in mixed_layers(mix(g, share=2).module).values()}) == 2 + 8
    # prepare is deterministic (a resumed run calls it again); the seed graph is untouched
    a, b = (MixtureGrowth().prepare(g, morphir.GrowConfig(seed=3)) for _ in range(2))
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not mixed_layers(g.module)
    # baked into plain layers it computes the same and pickles whole
    x = torch.randn(3, 1, 8, 8)
    m.module.eval()
    y = m.module(x)
    plain = bake(copy.deepcopy(m.module))
    assert not mixed_layers(plain) and isinstance(plain.get_submodule("features.1.0").weight, nn.Parameter)
    assert torch.allclose(plain(x), y, atol=1e-5)
    assert torch.equal(m.module(x), y)  # baking a copy leaves the original mixed and working
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    assert buffer.tell() > 0


def test_a_model_without_layers_to_mix_and_bad_knobs_are_refused() -> None:
    g = morphir.trace(nn.Sequential(nn.ReLU(), nn.Flatten()), torch.randn(1, 4, 2, 2))
    with pytest.raises(morphir.MorphirError, match="no convolution .* or linear layer"):
        mix(g)
    with pytest.raises(morphir.MorphirError, match="factor"):
        MixtureGrowth(factor=1)
    with pytest.raises(morphir.MorphirError, match="init must be one of"):
        MixtureGrowth(init="zeros")
    with pytest.raises(morphir.MorphirError, match="templates must be at least 2"):
        MixtureGrowth(templates=1)
    assert MixtureGrowth().name == "mixture" and MixtureGrowth.preserving is False


# -- (2) tiling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["random", "copy", "orthogonal"])
def test_tiling_makes_blocks_of_templates_mixed_by_each_blocks_coefficients(init: str) -> None:
    a = mix(seed_graph(), templates=4)
    randomise_norms(a, 1)
    old = mixed_layers(a.module)
    w = widen(a, 2, init=init, generator=torch.Generator().manual_seed(0))
    new = mixed_layers(w.module)
    assert tuple(new["features.0.0"].weight.shape) == (32, 1, 3, 3)  # the input keeps its channel
    assert tuple(new["features.1.0"].weight.shape) == (32, 32, 3, 3)
    assert tuple(new["classifier"].weight.shape) == (10, 32)  # the output keeps its classes
    assert [grp.width for grp in w.groups if grp.growable] == [32] * 16
    bn, bn_old = w.submodule("features.3.1"), a.submodule("features.3.1")
    assert torch.equal(bn.running_var, torch.cat([bn_old.running_var] * 2))
    assert torch.equal(bn.weight, torch.cat([bn_old.weight] * 2))
    assert w.module(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    for name in HIDDEN + ["features.0.0", "classifier"]:
        layer, small = new[name], old[name]
        assert torch.equal(templates(layer), templates(small))  # no fusion: the same templates
        rows, cols, k = alpha(layer).shape
        assert (rows, cols, k) == ((1 if name == "classifier" else 2), (1 if name == "features.0.0" else 2), 4)
        for i in range(rows):
            for j in range(cols):
                assert torch.allclose(block(layer, i, j), mixed(alpha(layer)[i, j], templates(layer)), atol=1e-6)
        assert torch.equal(alpha(layer)[0, 0], alpha(small)[0, 0])  # the trained block is kept
        assert torch.allclose(block(layer, 0, 0), small.weight.detach(), atol=1e-6)
        kept = alpha(small)[0, 0]
        fresh = [alpha(layer)[i, j] for i in range(rows) for j in range(cols) if (i, j) != (0, 0)]
        if init == "copy":
            assert all(torch.equal(f, kept) for f in fresh)
        else:
            assert all(torch.isclose(f.norm(), kept.norm(), rtol=1e-4) for f in fresh)
            dots = [float(f @ kept) / float(kept.norm()) ** 2 for f in fresh]
            if init == "orthogonal":
                assert max(abs(d) for d in dots) < 1e-5  # new α ⟂ old α
                vecs = torch.stack([kept, *fresh])
                gram = vecs @ vecs.T / kept.norm() ** 2  # 1 + 3 vectors in 4 dims: all orthogonal
                assert torch.allclose(gram, torch.eye(len(vecs)), atol=1e-5)
            else:
                assert max(abs(d) for d in dots) > 1e-3
    if init == "copy":  # copied blocks: every block of a hidden layer is the trained weight
        assert torch.allclose(block(new["features.1.0"], 1, 0), old["features.1.0"].weight.detach(), atol=1e-6)


# -- (3) fusion ---------------------------------------------------------------------------------------
def test_fusion_keeps_nets_a_and_b_on_the_diagonal_and_averages_them_at_the_output() -> None:
    a, b = mix(seed_graph(0), templates=4, seed=0), mix(seed_graph(1), templates=4, seed=1)
    randomise_norms(a, 1)
    randomise_norms(b, 2)
    w = widen(a, 2, others=[b], init="orthogonal", generator=torch.Generator().manual_seed(0))
    la, lb, lw = mixed_layers(a.module), mixed_layers(b.module), mixed_layers(w.module)
    for name in HIDDEN:
        assert torch.equal(templates(lw[name]), torch.cat([templates(la[name]), templates(lb[name])]).detach())
        assert torch.allclose(block(lw[name], 0, 0), la[name].weight.detach(), atol=1e-6)
        assert torch.allclose(block(lw[name], 1, 1), lb[name].weight.detach(), atol=1e-6)
        assert not torch.allclose(block(lw[name], 0, 1), torch.zeros(16, 16, 3, 3))
        diag = [alpha(lw[name])[0, 0], alpha(lw[name])[1, 1]]
        assert torch.equal(diag[0][:4], alpha(la[name])[0, 0]) and not diag[0][4:].any()
        assert torch.equal(diag[1][4:], alpha(lb[name])[0, 0]) and not diag[1][:4].any()
        for off in (alpha(lw[name])[0, 1], alpha(lw[name])[1, 0]):
            assert all(abs(float(off @ d)) < 1e-5 * float(d.norm()) ** 2 for d in diag)
    assert torch.allclose(block(lw["features.0.0"], 0, 0), la["features.0.0"].weight.detach(), atol=1e-6)
    assert torch.allclose(block(lw["features.0.0"], 1, 0), lb["features.0.0"].weight.detach(), atol=1e-6)
    bn = w.submodule("features.9.1")
    assert torch.equal(bn.running_mean, torch.cat([a.submodule("features.9.1").running_mean,
                                                   b.submodule("features.9.1").running_mean]))
    assert torch.equal(w.submodule("classifier").bias, (la["classifier"].bias + lb["classifier"].bias).detach() / 2)
    # with the off-diagonal blocks at zero the fused net computes nets A and B side by side
    with torch.no_grad():
        for layer in lw.values():
            grid = layer.parametrizations.weight.original
            if grid.shape[0] > 1 and grid.shape[1] > 1:
                grid[0, 1] = 0
                grid[1, 0] = 0
    x = torch.randn(6, 1, 8, 8)
    for g in (a, b, w):
        g.module.eval()
    with torch.no_grad():
        ya, yb, yw = a.module(x), b.module(x), w.module(x)
    assert not torch.allclose(ya, yb, atol=1e-2)
    assert torch.allclose(yw, (ya + yb) / 2, atol=1e-5)


@pytest.mark.parametrize("name", ["densenet", "mobilenet_v2", "resnet20"])
def test_fusion_and_regrowth_hold_through_concatenations_depthwise_convs_and_residual_adds(name: str) -> None:
    torch.manual_seed(0)
    g = morphir.trace(zoo.build(name, (3, 8, 8), 10), torch.randn(1, 3, 8, 8))
    a, b = mix(g, seed=0), mix(g, seed=1)
    randomise_norms(a, 1)
    randomise_norms(b, 2)
    w = widen(a, 2, others=[b], generator=torch.Generator().manual_seed(0))
    assert all(grp.width == 2 * g.group(grp.name).width for grp in w.groups if grp.growable)
    reordered = [n for n, layer in mixed_layers(w.module).items()
                 if layer.parametrizations.weight[0].columns is not None]
    assert bool(reordered) == (name == "densenet")  # a concat interleaves the copies: columns reordered
    x = torch.randn(4, 3, 8, 8)
    for graph in (a, b, w):
        graph.module.eval()
    with torch.no_grad():
        for layer in mixed_layers(w.module).values():
            grid = layer.parametrizations.weight.original
            if grid.shape[0] > 1 and grid.shape[1] > 1:
                grid[0, 1] = grid[1, 0] = 0
        assert torch.allclose(w.module(x), (a.module(x) + b.module(x)) / 2, atol=1e-5)
        # a second growth (×3, no fusion) with its new blocks at zero computes what the first did
        w3 = widen(w, 3, init="random", generator=torch.Generator().manual_seed(1))
        w3.module.eval()
        assert not torch.allclose(w3.module(x), w.module(x), atol=1e-3)
        for layer in mixed_layers(w3.module).values():
            grid = layer.parametrizations.weight.original
            r, c = (n if n == 1 else n // 3 for n in grid.shape[:2])
            kept = grid[:r, :c].clone()
            grid.zero_()
            grid[:r, :c] = kept
        assert torch.allclose(w3.module(x), w.module(x), atol=1e-5)


# -- (4) in the growth loop ----------------------------------------------------------------------------
def strip(metrics):
    return [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in metrics]


def test_mixture_grows_in_the_loop_resumes_exactly_and_exports(tmp_path: Path) -> None:
    d = data.load_data("digits", seed=0, batch_size=64)
    opts = {"phases": 2, "phase_epochs": 1, "progress": False}

    def run(**kw):
        torch.manual_seed(0)
        return morphir.grow(zoo.build("vgg19", (1, 8, 8), 10), d.train, d.val, F.cross_entropy,
                            method=MixtureGrowth(), **opts, **kw)

    full = run(run_dir=tmp_path / "a")
    first, second = full.metrics
    assert math.isfinite(first["loss_jump"]) and first["loss_jump"] != 0.0  # not function-preserving
    assert first["mixture_nets"] == 2 and first["applied"] == {"mixture": 1}
    assert math.isfinite(first["mixture_other_train_loss"][0])
    assert all(second["widths"][k] == 2 * first["widths"][k] for k in first["widths"])
    assert full.graph.group("features.9.0").width == 32 and second["params"] > first["params"]
    assert full.graph.module(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert [[e["factor"], e["nets"]] for e in full.log[0]] == [[2, 2]]

    # a run stopped after phase 1 and resumed ends like the uninterrupted one
    def stop(record):
        if record["phase"] == 1:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        run(run_dir=tmp_path / "b", on_phase=stop)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["phase"] == 1
    resumed = run(run_dir=tmp_path / "b", resume=True)
    assert strip(resumed.metrics) == strip(full.metrics)
    sa, sb = full.graph.module.state_dict(), resumed.graph.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    # a log that does not fit the model is refused on replay
    bad = [{**full.log[0][0], "layers": {"classifier": [9, 9, 9]}}]
    seed = MixtureGrowth().prepare(seed_graph(), morphir.GrowConfig())
    with pytest.raises(morphir.CheckpointError, match="other layers"):
        MixtureGrowth().replay(seed, bad, morphir.default_registry())

    # steps=1: a later growth step adds nothing
    step = morphir.GrowthStep(full.graph, [], None, [], F.cross_entropy, morphir.GrowConfig(),
                              morphir.default_registry(), 2, 0)
    later = MixtureGrowth().grow(step)
    assert later.result is None and not later.chosen

    # ONNX: the weights are computed in the exported graph; its logits are large after two one-epoch
    # phases (hundreds), so the check's tolerance is relative to them
    module = full.graph.module.eval()
    with torch.no_grad():
        scale = float(module(torch.randn(8, 1, 8, 8)).abs().max())
    path = morphir.export_onnx(module, tmp_path / "grown.onnx", (torch.randn(1, 1, 8, 8),), check=True,
                               atol=max(1e-4, 1e-6 * scale))
    assert Path(path).stat().st_size > 0 and mixed_layers(module)  # the module itself is still mixed
