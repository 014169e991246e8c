"""Property-based tests: random small DAG conv nets, traced and rewritten by every built-in morphism.

A network is drawn as a plain-data *spec* ``(in_ch, hw, ops, head, n_out, seed)``; tensor 0 is the
input and op ``i`` produces tensor ``i + 1``. Ops::

    ("conv", src, cout, k, bias, bn, act)   Conv2d (k in {1, 3}, size-keeping padding) [+ BN] [+ act]
    ("dw",   src, k, bias, act)             depthwise Conv2d (groups = channels) [+ act]
    ("add",  a, b)                          residual add of two tensors with equal shapes
    ("cat",  (a, b[, c]))                   torch.cat along dim 1 (same spatial size)
    ("pool", src, half)                     MaxPool2d: 2x2/2 (half) or 3x3/1 pad 1 (same size)

The head takes every tensor no op reads (so there is no dead code), reduces each by a global mean or
a flatten, concatenates them and applies one Linear. The forward interprets the spec in a Python
loop, which torch.fx traces into a flat graph.

Properties (numbers as in the section headers):

1. the analysis agrees with the tensors and layers (widths, segments, producers) and with an
   independent union-find oracle (``expected_groups``) built from the spec alone;
2. splitting every split candidate at θ = 0 keeps the output, doubles each split group, adds parameters;
3. one split with a random θ ≠ 0 (grown ×4 past ReLU kinks) runs, adds exactly ``delta_params``, and
   changes what the group's nonlinearities compute;
4. pruning a random subset (a channel left in each group) runs and shrinks exactly those groups;
   4b. with 1x1 kernels a prune computes exactly what zeroing the channels' incoming weights does;
5. deepening every candidate at θ = 0 keeps the output and adds ``sum(delta_params)``;
6. a split at θ = 0 followed by a prune of the new copy restores every width;
7. the traced module computes bit for bit what the eager model computes;
8. random sequences of split / prune / deepen keep the analysis consistent and the function;
9. the built-in morphisms pass ``morphir.contract.check_morphism`` on random nets.

The plain tests at the end are regressions for library bugs these properties found.
MORPHIR_PROPERTY_SCALE=20 multiplies every example count for a longer bug hunt.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

import morphir
from morphir.contract import calibrate, check_morphism

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
CALIB_BATCH = 32

SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# MORPHIR_PROPERTY_SCALE=20 multiplies every example count (a longer bug hunt)
SCALE = int(os.environ.get("MORPHIR_PROPERTY_SCALE", "1"))


def n(examples: int) -> int:
    return examples * SCALE


@pytest.fixture(scope="module", autouse=True)
def _fast_tiny_kernels():
    """Tiny convs are dominated by per-call overhead: oneDNN builds a kernel for every new shape and
    the intra-op thread pool spin-waits when the cores are busy (up to ~20 ms a conv). One thread and
    the native kernels take ~0.05 ms. Both are restored after this module."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


# -- the random network ---------------------------------------------------------------------------
@st.composite
def net_specs(draw, min_ops: int = 3, max_ops: int = 8, kernels: tuple[int, ...] = (1, 3)):
    in_ch = draw(st.sampled_from([2, 3]))
    hw = draw(st.sampled_from([4, 6]))
    n_ops = draw(st.integers(min_ops, max_ops))
    shapes = [(in_ch, hw, hw)]  # (channels, height, width) of every tensor so far
    ops = []
    for _ in range(n_ops):
        n = len(shapes)
        kind = draw(st.sampled_from(["conv", "conv", "conv", "dw", "add", "cat", "pool"]))
        if kind == "add":
            pairs = [(a, b) for a in range(n) for b in range(a, n) if shapes[a] == shapes[b]]
            distinct = [p for p in pairs if p[0] != p[1]]
            # mostly real residuals; x + x now and then
            pool = distinct if distinct and draw(st.integers(0, 4)) > 0 else pairs
            a, b = draw(st.sampled_from(pool))
            ops.append(("add", a, b))
            shapes.append(shapes[a])
            continue
        if kind == "cat":
            src = draw(st.integers(0, n - 1))
            same = [j for j in range(n) if shapes[j][1:] == shapes[src][1:]]
            k = draw(st.integers(2, 3))
            srcs = (src, *(draw(st.sampled_from(same)) for _ in range(k - 1)))
            ops.append(("cat", srcs))
            shapes.append((sum(shapes[j][0] for j in srcs), *shapes[src][1:]))
            continue
        src = draw(st.integers(0, n - 1))
        c, h, w = shapes[src]
        if kind == "pool":
            half = h >= 2 and draw(st.booleans())
            ops.append(("pool", src, half))
            shapes.append((c, h // 2, w // 2) if half else (c, h, w))
        elif kind == "dw":
            k = draw(st.sampled_from(kernels))
            ops.append(("dw", src, k, draw(st.booleans()), draw(st.sampled_from([None, *ACTS]))))
            shapes.append((c, h, w))
        else:
            # reuse an existing channel count half of the time, so residual adds of convs are common
            cout = draw(st.integers(1, 6) | st.sampled_from(sorted({s[0] for s in shapes if s[0] <= 6})))
            k = draw(st.sampled_from(kernels))
            act = draw(st.sampled_from([None, "relu", "relu", "gelu", "tanh"]))
            ops.append(("conv", src, cout, k, draw(st.booleans()), draw(st.booleans()), act))
            shapes.append((cout, h, w))
    head = draw(st.sampled_from(["mean", "flatten"]))
    n_out = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return (in_ch, hw, tuple(ops), head, n_out, seed)


def _sources(op) -> tuple[int, ...]:
    if op[0] == "add":
        return (op[1], op[2])
    if op[0] == "cat":
        return tuple(op[1])
    return (op[1],)


def _shapes(spec) -> list[tuple[int, int, int]]:
    in_ch, hw, ops = spec[:3]
    shapes = [(in_ch, hw, hw)]
    for op in ops:
        if op[0] == "conv":
            shapes.append((op[2], *shapes[op[1]][1:]))
        elif op[0] == "cat":
            shapes.append((sum(shapes[j][0] for j in op[1]), *shapes[op[1][0]][1:]))
        elif op[0] == "pool" and op[2]:
            c, h, w = shapes[op[1]]
            shapes.append((c, h // 2, w // 2))
        else:
            shapes.append(shapes[op[1]])
    return shapes


def _sinks(spec) -> list[int]:
    ops = spec[2]
    used = {j for op in ops for j in _sources(op)}
    return [j for j in range(1, len(ops) + 1) if j not in used]


class SpecNet(nn.Module):
    """The network a spec describes; ``forward`` interprets the spec (plain Python data)."""

    def __init__(self, spec):
        super().__init__()
        in_ch, hw, ops, head, n_out, _ = spec
        self.spec_ops = tuple(ops)
        self.head = head
        shapes = _shapes(spec)
        for i, op in enumerate(ops):
            c = shapes[op[1]][0] if op[0] in ("conv", "dw") else None
            if op[0] == "conv":
                _, _, cout, k, bias, bn, act = op
                setattr(self, f"conv{i}", nn.Conv2d(c, cout, k, padding=k // 2, bias=bias))
                if bn:
                    setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
                if act:
                    setattr(self, f"act{i}", ACTS[act]())
            elif op[0] == "dw":
                _, _, k, bias, act = op
                setattr(self, f"dw{i}", nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=bias))
                if act:
                    setattr(self, f"act{i}", ACTS[act]())
            elif op[0] == "pool":
                setattr(self, f"pool{i}", nn.MaxPool2d(2, 2) if op[2] else nn.MaxPool2d(3, 1, padding=1))
        self.sinks = tuple(_sinks(spec))
        feats = sum(shapes[j][0] * (1 if head == "mean" else shapes[j][1] * shapes[j][2]) for j in self.sinks)
        self.fc = nn.Linear(feats, n_out)

    def forward(self, x):
        ts = [x]
        for i, op in enumerate(self.spec_ops):
            kind = op[0]
            if kind == "conv":
                y = getattr(self, f"conv{i}")(ts[op[1]])
                if op[5]:
                    y = getattr(self, f"bn{i}")(y)
                if op[6]:
                    y = getattr(self, f"act{i}")(y)
            elif kind == "dw":
                y = getattr(self, f"dw{i}")(ts[op[1]])
                if op[4]:
                    y = getattr(self, f"act{i}")(y)
            elif kind == "add":
                y = ts[op[1]] + ts[op[2]]
            elif kind == "cat":
                y = torch.cat([ts[j] for j in op[1]], 1)
            else:
                y = getattr(self, f"pool{i}")(ts[op[1]])
            ts.append(y)
        if self.head == "mean":
            feats = [ts[j].mean((2, 3)) for j in self.sinks]
        else:
            feats = [torch.flatten(ts[j], 1) for j in self.sinks]
        z = torch.cat(feats, 1) if len(feats) > 1 else feats[0]
        return self.fc(z)


def build(spec):
    """``(eager model in eval mode with calibrated BN, traced MorphGraph)`` for ``spec``."""
    in_ch, hw = spec[:2]
    torch.manual_seed(spec[-1])
    model = SpecNet(spec)
    calibrate(model, (torch.randn(CALIB_BATCH, in_ch, hw, hw),))
    return model, morphir.trace(model, torch.randn(2, in_ch, hw, hw))


def expected_groups(spec) -> dict[frozenset, tuple[int, bool, bool]]:
    """Oracle: {producer modules: (width, growable, nonlinear)} of every group, from the spec alone."""
    in_ch, hw, ops, head, n_out, _ = spec
    parent: list[int] = []
    width: list[int] = []
    producer: dict[int, str] = {}
    blocked: set[int] = set()
    nonlinear: set[int] = set()

    def new(w: int, prod: str | None = None) -> int:
        parent.append(len(parent))
        width.append(w)
        if prod is not None:
            producer[len(parent) - 1] = prod
        return len(parent) - 1

    def find(s: int) -> int:
        while parent[s] != s:
            s = parent[s]
        return s

    lays: list[list[int]] = [[new(in_ch)]]
    blocked.add(0)  # network input
    for i, op in enumerate(ops):
        kind = op[0]
        if kind == "conv":
            s = new(op[2], f"conv{i}")
            if op[6]:
                nonlinear.add(s)
            lays.append([s])
        elif kind == "dw":
            lay = lays[op[1]]
            if len(lay) == 1 and width[lay[0]] == 1:  # a 1-channel depthwise conv is an ordinary conv
                lay = [new(1, f"dw{i}")]
            if op[4]:
                nonlinear.update(lay)
            lays.append(lay)
        elif kind == "add":
            a, b = lays[op[1]], lays[op[2]]
            if len(a) == len(b) and all(width[x] == width[y] for x, y in zip(a, b)):
                for x, y in zip(a, b):
                    parent[find(x)] = find(y)
            else:
                blocked.update(a + b)
            lays.append(a)
        elif kind == "cat":
            lays.append([s for j in op[1] for s in lays[j]])
        else:  # max pool
            nonlinear.update(lays[op[1]])
            lays.append(lays[op[1]])
    blocked.add(new(n_out, "fc"))  # network output
    comps: dict[int, list[int]] = {}
    for s in range(len(parent)):
        comps.setdefault(find(s), []).append(s)
    out = {}
    for members in comps.values():
        prods = frozenset(producer[s] for s in members if s in producer)
        out[prods] = (width[members[0]], not any(s in blocked for s in members), any(s in nonlinear for s in members))
    return out


# -- helpers ---------------------------------------------------------------------------------------
def widths(g: morphir.MorphGraph) -> dict[str, int]:
    return {grp.name: grp.width for grp in g.groups}


def probe_out(g: morphir.MorphGraph) -> torch.Tensor:
    return g.run_probe()


def split_candidates(g: morphir.MorphGraph) -> list:
    return morphir.candidates(g, "split")


def draw_split(g: morphir.MorphGraph, data):
    """One split candidate of ``g`` (the example is discarded when there is none)."""
    cands = split_candidates(g)
    assume(cands)
    return data.draw(st.sampled_from(cands))


def follower_repeats_group(g: morphir.MorphGraph, group: str) -> bool:
    """A batch norm / depthwise conv after e.g. torch.cat([h, h]) carries ``group`` in two segments."""
    return any(sum(s.group == group for s in lay.segments) > 1 for lay in g.analysis.follower_layouts.values())


NONLINEAR = (nn.ReLU, nn.GELU, nn.Tanh, nn.MaxPool2d)


def module_outputs(g: morphir.MorphGraph, modules: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of ``modules`` on the probe batch (forward hooks)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [g.submodule(m).register_forward_hook(lambda mod, a, out, m=m: seen.setdefault(m, out.detach()))
             for m in modules]
    try:
        with torch.no_grad():  # not g.run_probe(): it may answer from a cache without running
            g.module.eval()(*g.probe_inputs)
    finally:
        for h in hooks:
            h.remove()
    assert seen.keys() == set(modules)
    return seen


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / (1 + float(a.abs().max()))


def split_gap(g: morphir.MorphGraph, g2: morphir.MorphGraph, group: str, c: int, new: int) -> float:
    """How far ½ (copy c + copy new) in ``g2`` is from channel c in ``g``, after each activation or
    max pool that carries ``group`` (the largest relative gap)."""
    nodes = [g.node(n) for n in g.group(group).nodes]
    acts = [n for n in nodes if n.op == "call_module" and isinstance(g.submodule(n.target), NONLINEAR)]
    assert acts, f"group {group} is marked nonlinear but no activation or max pool carries it"
    ya, yb = module_outputs(g, [n.target for n in acts]), module_outputs(g2, [n.target for n in acts])
    gap = 0.0
    for n in acts:
        s1 = next(s for s in g.layout(n.name).segments if s.group == group)
        s2 = next(s for s in g2.layout(n.name).segments if s.group == group)
        assert s2.width == s1.width + 1
        old = ya[n.target][:, s1.offset + c]
        mixed = 0.5 * (yb[n.target][:, s2.offset + c] + yb[n.target][:, s2.offset + new])
        gap = max(gap, rel_change(old, mixed))
    return gap


def state(g: morphir.MorphGraph) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in g.module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), f"{k} changed"


# -- 1. analysis -------------------------------------------------------------------------------------
def check_analysis(g: morphir.MorphGraph) -> None:
    """Invariants of any channel analysis: unique names, widths that match the tensors and layers."""
    groups = g.groups
    names = [grp.name for grp in groups]
    assert len(names) == len(set(names)) == len(g.analysis.groups)
    by_name = {grp.name: grp for grp in groups}
    an = g.analysis

    for grp in groups:
        if grp.growable:
            assert len(grp.producers) >= 1, grp
        assert grp.width >= 1
        for p in grp.producers:
            assert g.submodule(p.module).weight.shape[0] == grp.width, (grp.name, p)
        for node in grp.nodes:
            assert grp.name in an.group_of_node(node), (grp.name, node)

    # every tensor's channel axis is exactly the sum of its groups' widths, segments laid end to end
    for node, lay in an.layouts.items():
        shape = g.shape(node)
        assert shape is not None and len(shape) == lay.ndim
        assert shape[lay.axis] == lay.size, (node, tuple(shape), lay)
        offset = 0
        for seg in lay.segments:
            assert seg.offset == offset
            assert seg.width == by_name[seg.group].width, (node, seg)
            offset += seg.width * seg.inner
    for m, lay in an.consumer_layouts.items():
        w = g.submodule(m).weight
        assert w.shape[1] == lay.size, (m, tuple(w.shape), lay)
    for m, lay in an.follower_layouts.items():
        mod = g.submodule(m)
        assert mod.weight.shape[0] == lay.size, (m, lay)
    # every conv's bookkeeping agrees with its weight (a depthwise conv stays depthwise)
    for name, mod in g.module.named_modules():
        if isinstance(mod, nn.Conv2d):
            assert mod.weight.shape[0] == mod.out_channels, name
            assert mod.weight.shape[1] * mod.groups == mod.in_channels, name
        elif isinstance(mod, nn.BatchNorm2d):
            assert mod.weight.shape[0] == mod.running_mean.shape[0] == mod.num_features, name
        elif isinstance(mod, nn.Linear):
            assert tuple(mod.weight.shape) == (mod.out_features, mod.in_features), name


@settings(max_examples=n(60), **SETTINGS)
@given(net_specs())
def test_analysis_consistent_with_shapes_and_oracle(spec):
    _, g = build(spec)
    check_analysis(g)
    groups = g.groups

    # the partition into groups, their widths, growability and nonlinearity match the oracle
    got = {frozenset(p.module for p in grp.producers): (grp.width, grp.growable, grp.nonlinear) for grp in groups}
    assert got == expected_groups(spec)


# -- 7. tracing ------------------------------------------------------------------------------------
@settings(max_examples=n(40), **SETTINGS)
@given(net_specs(), st.integers(1, 5))
def test_trace_matches_eager(spec, batch):
    model, g = build(spec)
    in_ch, hw = spec[:2]
    x = torch.randn(batch, in_ch, hw, hw)
    with torch.no_grad():
        eager = model(x)
        assert torch.equal(g.module(x), eager)
        assert torch.equal(g(x), eager)
        assert torch.equal(g.run_probe(), model(*g.probe_inputs))
    assert eager.shape == (batch, spec[4])
    assert not g.module.training
    assert g.num_params() == sum(p.numel() for p in model.parameters())


# -- 2. split everything at θ = 0 ---------------------------------------------------------------------
@settings(max_examples=n(40), **SETTINGS)
@given(net_specs())
def test_split_all_at_zero_preserves_and_doubles(spec):
    _, g = build(spec)
    cands = split_candidates(g)
    assume(cands)
    before = state(g)
    split_groups = {c.site.anchor for c in cands}
    g2 = morphir.apply(g, cands)
    err, tol = morphir.output_mismatch(g, g2)
    assert err <= tol
    assert g2.num_params() > g.num_params()
    w1, w2 = widths(g), widths(g2)
    for name, w in w1.items():
        assert w2[name] == (2 * w if name in split_groups else w), name
    assert_same_state(before, state(g))  # the original graph is untouched


# -- 3. one split with a live θ -----------------------------------------------------------------------
@settings(max_examples=n(40), **SETTINGS)
@given(net_specs(), st.data())
def test_split_one_with_random_theta_runs_and_changes_output(spec, data):
    _, g = build(spec)
    cand = draw_split(g, data)
    grp = g.group(cand.site.anchor)
    assert grp.nonlinear  # split is only offered where a nonlinearity acts

    zero = morphir.apply(g, [cand])
    if follower_repeats_group(g, grp.name):
        event("a follower reads the group twice")
    assert zero.num_params() - g.num_params() == cand.delta_params
    assert zero.group(grp.name).width == grp.width + 1

    # The network output can legitimately stay put (a later ReLU dead on the whole probe batch:
    # relu(-0.02 * relu(h)) without bias was found). What a split with θ ≠ 0 must change is the
    # group's nonlinearity: behind it the two copies no longer add up to the old channel,
    # ½ (act(p + δ) + act(p − δ)) ≠ act(p). Checked at every activation / max pool of the group.
    new, c = grp.width, cand.site.index
    assert split_gap(g, zero, grp.name, c, new) <= 1e-5

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    shape = cand.morphism.theta_shape(g, cand.site)
    w_in = g.incoming_weights(grp.name, c)
    assert tuple(shape) == tuple(w_in.shape)
    theta = torch.randn(shape, generator=gen) * float(w_in.abs().mean().clamp_min(1e-3))
    y = probe_out(g)
    producers = [p.module for p in grp.producers]
    gap, moved = 0.0, False
    for scale in (1.0, 4.0, 16.0, 64.0):
        g2 = morphir.apply(g, [cand], theta={cand: scale * theta})
        y2 = probe_out(g2)
        assert y2.shape == y.shape and torch.isfinite(y2).all()
        assert g2.group(grp.name).width == grp.width + 1
        before, after = module_outputs(g, producers), module_outputs(g2, producers)
        moved = moved or any(rel_change(before[m][:, c], after[m][:, c]) > 1e-5 for m in producers)
        gap = split_gap(g, g2, grp.name, c, new)
        if gap > 1e-5:
            event("network output changed" if morphir.output_mismatch(g, g2)[0] > 0 else "network output kept")
            break
    if not moved:  # every input of the producers is dead (zero) on the probe batch: θ has nothing to act on
        event("producer input dead")
        return
    assert gap > 1e-5, f"θ at {cand.site} never changed what the group's nonlinearities compute"


# -- 4. prune a random subset --------------------------------------------------------------------------
@settings(max_examples=n(40), **SETTINGS)
@given(net_specs(), st.data())
def test_prune_subset_shrinks(spec, data):
    _, g = build(spec)
    cands = morphir.candidates(g, "prune")
    assume(cands)
    by_group: dict[str, list] = {}
    for c in cands:
        by_group.setdefault(c.site.anchor, []).append(c)
    chosen = []
    for name, cs in by_group.items():
        k = data.draw(st.integers(0, len(cs) - 1), label=f"n pruned in {name}")
        chosen += data.draw(st.permutations(cs), label=f"order in {name}")[:k]
    assume(chosen)
    pruned = {name: sum(c.site.anchor == name for c in chosen) for name in by_group}

    before = state(g)
    res = morphir.rewrite(g, chosen)
    g2 = res.graph
    assert res.modified
    y, y2 = probe_out(g), probe_out(g2)
    assert y2.shape == y.shape and torch.isfinite(y2).all()
    assert g2.num_params() < g.num_params()
    w1, w2 = widths(g), widths(g2)
    for name, w in w1.items():
        assert w2[name] == w - pruned.get(name, 0), name
    assert_same_state(before, state(g))

    # θ = 0 is a no-op: not modified, the same weights
    res0 = morphir.rewrite(g, chosen[:1], theta={chosen[0]: torch.zeros_like(g.incoming_weights(
        chosen[0].site.anchor, chosen[0].site.index))})
    assert not res0.modified
    assert_same_state(before, state(res0.graph))


def test_prune_every_channel_raises():
    spec = (3, 4, (("conv", 0, 2, 3, True, False, "relu"), ("conv", 1, 3, 1, True, False, None)), "mean", 2, 0)
    _, g = build(spec)
    cands = [c for c in morphir.candidates(g, "prune") if c.site.anchor == "conv0"]
    assert len(cands) == 2
    with pytest.raises(morphir.MorphismError):
        morphir.apply(g, cands)


def draw_prunes(g: morphir.MorphGraph, data) -> list:
    """Up to 5 prune candidates, leaving at least one channel in every group."""
    cands = morphir.candidates(g, "prune")
    assume(cands)
    per: dict[str, list] = {}
    for c in data.draw(st.lists(st.sampled_from(cands), min_size=1, max_size=5, unique_by=lambda c: c.site)):
        per.setdefault(c.site.anchor, []).append(c)
    chosen = [c for name, cs in per.items() for c in cs[: g.group(name).width - 1]]
    assume(chosen)
    return chosen


def zero_incoming(g: morphir.MorphGraph, chosen: list) -> morphir.MorphGraph:
    """A copy of ``g`` with the incoming weights of the chosen channels set to zero."""
    zeroed = g.copy()
    with torch.no_grad():
        for c in chosen:
            for p in g.group(c.site.anchor).producers:
                zeroed.submodule(p.module).weight[c.site.index] = 0
    return zeroed


# -- 4b. prune folds the removed channel's constant exactly ------------------------------------------
@settings(max_examples=n(30), **SETTINGS)
@given(net_specs(kernels=(1,)), st.data())
def test_prune_equals_zeroing_incoming_weights_with_1x1_kernels(spec, data):
    """A pruned channel behaves as if its incoming weights were zero: it emits a constant, which
    is folded into the consumers' biases. With 1x1 kernels only (no zero padding to make the
    constant position-dependent) the fold is always possible, so the pruned net must compute
    exactly what the net with those weights zeroed computes."""
    _, g = build(spec)
    chosen = draw_prunes(g, data)
    zeroed = zero_incoming(g, chosen)
    g2 = morphir.apply(g, chosen)
    err, tol = morphir.output_mismatch(zeroed, g2)
    assert err <= tol, f"pruned net differs from the zeroed one by {err:.3g} (tolerance {tol:.3g})"


# -- 4c. constant channels are pruned where that is free ----------------------------------------------
@settings(max_examples=n(10), phases=[Phase.explicit, Phase.generate], **SETTINGS)
@given(net_specs(kernels=(1,)), st.data())
def test_prune_of_constant_channels_removes_them_exactly(spec, data):
    """Channels whose incoming weights are zero emit constants: pruning one removes it exactly when
    its constant folds into every consumer's bias, and keeps it otherwise, so the function never
    changes; with 1x1 kernels most of them fold."""
    _, g = build(spec)
    chosen = draw_prunes(g, data)
    zeroed = zero_incoming(g, chosen)
    sites = {c.site for c in chosen}
    g2 = morphir.apply(zeroed, [c for c in morphir.candidates(zeroed, "prune") if c.site in sites])
    for k, w in widths(g).items():
        assert w - sum(c.site.anchor == k for c in chosen) <= widths(g2)[k] <= w
    err, tol = morphir.output_mismatch(zeroed, g2)
    assert err <= tol


# -- 5. deepen everything at θ = 0 ----------------------------------------------------------------------
@settings(max_examples=n(40), **SETTINGS)
@given(net_specs())
def test_deepen_all_at_zero_preserves(spec):
    _, g = build(spec)
    cands = morphir.candidates(g, "deepen")
    assume(cands)
    g2 = morphir.apply(g, cands)
    err, tol = morphir.output_mismatch(g, g2)
    assert err <= tol
    assert g2.num_params() == g.num_params() + sum(c.delta_params for c in cands)
    assert len(g2.module.graph.nodes) > len(g.module.graph.nodes)


# -- 6. split then prune the new copy -------------------------------------------------------------------
@settings(max_examples=n(40), **SETTINGS)
@given(net_specs(), st.data())
def test_split_then_prune_copy_restores_widths(spec, data):
    _, g = build(spec)
    cand = draw_split(g, data)
    name, old = cand.site.anchor, g.group(cand.site.anchor).width
    g2 = morphir.apply(g, [cand])
    assert g2.group(name).width == old + 1
    # the new copy is appended at the end; both copies start with the original's incoming weights,
    # scaled down to their fresh norms where a batch norm follows (a producer that also reads the
    # group, e.g. conv -> conv tied by a residual add, gets a new column as well)
    grp = g.group(name)
    readers = {c.module for c in grp.consumers}
    s1, s2 = cand.morphism.copy_scales(g, cand.site)
    assert 0 < s2 <= 1 and 0 < s1 <= 1
    for p in grp.producers:
        w1, w2 = g.submodule(p.module).weight, g2.submodule(p.module).weight
        assert w2.shape[0] == old + 1
        if p.module not in readers:
            assert torch.allclose(w2[old], s2 * w1[cand.site.index], rtol=1e-5, atol=1e-7), p.module
            assert torch.allclose(w2[cand.site.index], s1 * w1[cand.site.index], rtol=1e-5, atol=1e-7), p.module
    prune = [c for c in morphir.candidates(g2, "prune") if c.site == morphir.Site(name, old)]
    assert len(prune) == 1
    g3 = morphir.apply(g2, prune)
    assert widths(g3) == widths(g)
    y, y3 = probe_out(g), probe_out(g3)
    assert y3.shape == y.shape and torch.isfinite(y3).all()
    # same parameters and shapes, except biases folding may have created
    s1, s3 = g.module.state_dict(), g3.module.state_dict()
    assert set(s1) <= set(s3)
    assert all(k.endswith(".bias") for k in set(s3) - set(s1)), set(s3) - set(s1)
    assert all(s1[k].shape == s3[k].shape for k in s1)


# -- 8. random sequences of rewrites -------------------------------------------------------------------
@settings(max_examples=n(30), **SETTINGS)
@given(net_specs(), st.data())
def test_random_rewrite_sequences(spec, data):
    """Rewrites compose: split / prune / deepen on graphs that earlier rewrites produced (new
    layers, doubled groups, folded biases) keep the analysis consistent; the preserving ones at
    θ = 0 keep the output, prunes shrink exactly the chosen groups."""
    _, g = build(spec)
    y0 = probe_out(g)
    steps = 0
    for _ in range(data.draw(st.integers(2, 4), label="steps")):
        kind = data.draw(st.sampled_from(["split", "prune", "deepen", "add_channel"]), label="morphism")
        cands = morphir.candidates(g, kind)
        if not cands:
            continue
        chosen = data.draw(st.lists(st.sampled_from(cands), min_size=1, max_size=4, unique_by=lambda c: c.site),
                           label=f"{kind} sites")
        if kind == "prune":  # keep at least one channel per group
            # a deepen identity conv whose input channel was pruned has an all-zero row; pruning that
            # channel is a no-op (test_prune_removes_a_channel_with_zero_weights)
            chosen = [c for c in chosen if bool(torch.any(g.incoming_weights(c.site.anchor, c.site.index) != 0))]
            per: dict[str, list] = {}
            for c in chosen:
                per.setdefault(c.site.anchor, []).append(c)
            chosen = [c for name, cs in per.items() for c in cs[: g.group(name).width - 1]]
        g2 = morphir.apply(g, chosen)
        check_analysis(g2)
        y2 = probe_out(g2)
        assert y2.shape == y0.shape and torch.isfinite(y2).all()
        w1, w2 = widths(g), widths(g2)
        if kind == "add_channel":  # θ = 0: a new channel nothing reads yet
            err, tol = morphir.output_mismatch(g, g2)
            assert err <= tol
            # each candidate's delta_params is exact alone (the contract suite checks it); new channels of
            # a group and of one that reads it also meet in the reader's weight, which adds their corner
            assert g2.num_params() >= g.num_params() + sum(c.delta_params for c in chosen)
            grew = {k: sum(c.site.anchor == k for c in chosen) for k in w1}
            assert w2 == {k: w + grew[k] for k, w in w1.items()}
        elif kind == "deepen":
            err, tol = morphir.output_mismatch(g, g2)
            assert err <= tol
            # growable groups keep name and width (a group tied to the input has no producer of its
            # own and takes the name of the first residual branch that writes into it: "@x",
            # then "add_res2", then "add_res22" for a branch inserted before that one)
            assert all(w2[k] == w1[k] for k in w1 if g.group(k).growable)
            assert g2.num_params() == g.num_params() + sum(c.delta_params for c in chosen)
        else:
            delta = {}
            for c in chosen:
                delta[c.site.anchor] = delta.get(c.site.anchor, 0) + (1 if kind == "split" else -1)
            # no group appears or vanishes (a depthwise conv pruned to one channel stays a follower)
            assert w2 == {k: w + delta.get(k, 0) for k, w in w1.items()}
            if kind == "split":
                err, tol = morphir.output_mismatch(g, g2)
                assert err <= tol
        g = g2
        steps += 1
    event(f"{steps} rewrites applied")


# -- 9. the library's own contract suite ----------------------------------------------------------------
@settings(max_examples=n(16), **SETTINGS)
@given(net_specs(), st.sampled_from(morphir.morphisms()))
def test_builtin_morphisms_pass_their_contract(spec, name):
    """morphir.contract.check_morphism on random nets, for every registered morphism (add_channel
    too): θ = 0 exact alone and all at once, honest ``modified``, live θ, delta_params, module names
    kept, original untouched."""
    _, g = build(spec)
    morphism = morphir.default_registry().get(name)
    assume(morphir.candidates(g, morphism))
    exact = name != "prune"  # a prune may fold its constant into a new bias
    check_morphism(morphism, g, per_anchor=1, exact_params=exact, at_once_limit=8)


# -- regressions found by the properties ------------------------------------------------------------
def test_split_width_one_conv_1_to_1():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)).eval()
    g = morphir.trace(net, torch.randn(2, 1, 4, 4))
    cands = morphir.candidates(g, "split")
    assert [str(c.site) for c in cands] == ["0[0]"]
    g2 = morphir.apply(g, cands)  # a plain Conv2d(1, 1) was once taken for a depthwise conv
    assert g2.group("0").width == 2
    assert morphir.output_mismatch(g, g2)[0] <= morphir.output_mismatch(g, g2)[1]


def test_prune_to_width_one_keeps_depthwise_conv_a_follower():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.dw = nn.Conv2d(2, 2, 3, padding=1, groups=2)
            self.fc = nn.Linear(2, 1)

        def forward(self, x):
            return self.fc(torch.relu(self.dw(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    g = morphir.trace(Net().eval(), torch.randn(2, 3, 4, 4))
    assert [f.module for f in g.group("conv").followers] == ["dw"]
    g1 = morphir.apply(g, [c for c in morphir.candidates(g, "prune") if c.site == morphir.Site("conv", 0)])
    assert g1.group("conv").width == 1
    assert [f.module for f in g1.group("conv").followers] == ["dw"]
    assert "dw" not in {grp.name for grp in g1.groups}
    # ... and the prune can be undone by a split
    g2 = morphir.apply(g1, [c for c in morphir.candidates(g1, "split") if c.site.anchor == "conv"])
    assert g2.group("conv").width == 2 and g2.module.dw.groups == 2


def test_delta_params_counts_a_follower_once_per_segment():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.dw = nn.Conv2d(4, 4, 1, groups=4)
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(self.dw(torch.cat([h, h], 1)).mean((2, 3)))

    torch.manual_seed(0)
    g = morphir.trace(Net().eval(), torch.randn(2, 3, 4, 4))
    cand = morphir.candidates(g, "split")[0]
    g2 = morphir.apply(g, [cand])
    # conv row 3 + bias 1, dw 2 channels x (weight 1 + bias 1), fc 2 columns x 1 output
    assert g2.num_params() - g.num_params() == 10
    assert cand.delta_params == 10  # fails: 8


def test_contract_live_theta_check_with_a_dead_relu_downstream():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 1, 1, bias=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(16, 2))
    with torch.no_grad():
        net[2].weight.fill_(-1.0)  # relu(-(relu(a) + relu(b))) == 0 on every input
    g = morphir.trace(net.eval(), torch.randn(2, 3, 4, 4))
    # the split of group "0" itself is live: behind its ReLU the copies no longer add up
    cand = next(c for c in morphir.candidates(g, "split") if c.site == morphir.Site("0", 0))
    theta = torch.ones(cand.morphism.theta_shape(g, cand.site))
    assert split_gap(g, morphir.apply(g, [cand], theta={cand: theta}), "0", 0, 2) > 1e-3
    check_morphism(morphir.default_registry().get("split"), g)


def test_prune_removes_a_channel_with_zero_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    with torch.no_grad():
        net[0].weight[0] = 0  # channel 0 emits the constant relu(bias[0])
    g = morphir.trace(net.eval(), torch.randn(2, 3, 4, 4))
    cand = next(c for c in morphir.candidates(g, "prune") if c.site == morphir.Site("0", 0))
    res = morphir.rewrite(g, [cand])
    assert res.modified
    assert res.graph.group("0").width == 1
    assert res.graph.num_params() - g.num_params() == cand.delta_params == -36  # row 3 + bias 1, fc 2 x 16
    err, tol = morphir.output_mismatch(g, res.graph)  # the constant folds into fc's bias
    assert err <= tol
