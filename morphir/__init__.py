"""morphir: grow neural networks by rewriting their torch.fx graphs.

>>> import torch, morphir
>>> g = morphir.trace(morphir.zoo.build("vgg19", (1, 8, 8)), torch.randn(1, 1, 8, 8))
>>> g2 = morphir.apply(g, morphir.candidates(g, "split"))   # every channel split, θ = 0
>>> morphir.output_mismatch(g, g2)[0] < 1e-4
True
"""

from morphir import zoo
from morphir.channel_rules import blocking, follower, passthrough
from morphir.channels import (
    ChannelAnalysis,
    ChannelGroup,
    ChannelRules,
    Consumer,
    Follower,
    Layout,
    Producer,
    RuleContext,
    Segment,
    analyse,
)
from morphir.engine import PassResult, apply, candidates, default_registry, morphisms, output_mismatch, rewrite
from morphir.errors import (
    AnalysisError,
    CheckpointError,
    DataError,
    ExportError,
    InvariantError,
    LoadError,
    MorphirError,
    MorphismError,
    PreservationError,
    TraceError,
    TrainingError,
)
from morphir.data import Data, load_data
from morphir.export import check_onnx, compile, export_onnx, export_program
from morphir.fidelity import Fidelity, check_fidelity
from morphir.graph import LeafPolicy, MorphGraph, check_probe, make_probe
from morphir.tracing import trace
from morphir.verify import Mismatch, find_mismatch, noise_profile
from morphir.grow import (
    GrowConfig,
    GrowResult,
    count_flops,
    grow,
    recalibrate_batch_norm,
    resolve_grower,
    retrain,
    select,
)
from morphir.growers import (
    Grower,
    Growth,
    GrowthStep,
    apply_in_turn,
    batch_loss,
    line_search,
    log_entry,
    replay_entries,
)
from morphir.report import write_report
from morphir.load import load_model, resolve_model
from morphir.morphism import Candidate, Morphism, Registry, Site
from morphir.optim_state import carry_state, rebuild_optimizer
from morphir.redundancy import redundant_channels
from morphir.rewrite import ChannelCopy, ParamEdit, Rewriter
from morphir.scoring import (
    ScoreConfig,
    ScoreContext,
    Scorer,
    curvature_factors,
    dot_at_consumers,
    exact_delta_loss,
    exact_delta_losses,
    gn_estimate,
    grad_dot,
    propagate,
    score,
    spearman,
)

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "Candidate",
    "CheckpointError",
    "Data",
    "DataError",
    "ExportError",
    "Fidelity",
    "Mismatch",
    "find_mismatch",
    "noise_profile",
    "check_fidelity",
    "check_probe",
    "GrowConfig",
    "GrowResult",
    "Grower",
    "Growth",
    "GrowthStep",
    "apply_in_turn",
    "batch_loss",
    "line_search",
    "log_entry",
    "replay_entries",
    "resolve_grower",
    "TrainingError",
    "check_onnx",
    "compile",
    "count_flops",
    "export_onnx",
    "export_program",
    "grow",
    "load_data",
    "recalibrate_batch_norm",
    "redundant_channels",
    "retrain",
    "select",
    "write_report",
    "carry_state",
    "rebuild_optimizer",
    "ParamEdit",
    "ChannelAnalysis",
    "ChannelCopy",
    "ChannelGroup",
    "ChannelRules",
    "Consumer",
    "Follower",
    "InvariantError",
    "Layout",
    "LeafPolicy",
    "LoadError",
    "MorphGraph",
    "Morphism",
    "MorphismError",
    "MorphirError",
    "PassResult",
    "PreservationError",
    "Producer",
    "Registry",
    "Rewriter",
    "ScoreConfig",
    "ScoreContext",
    "Scorer",
    "RuleContext",
    "Segment",
    "Site",
    "TraceError",
    "analyse",
    "apply",
    "blocking",
    "candidates",
    "curvature_factors",
    "default_registry",
    "dot_at_consumers",
    "exact_delta_loss",
    "exact_delta_losses",
    "follower",
    "gn_estimate",
    "grad_dot",
    "load_model",
    "make_probe",
    "morphisms",
    "output_mismatch",
    "passthrough",
    "propagate",
    "resolve_model",
    "rewrite",
    "score",
    "spearman",
    "trace",
    "zoo",
]
