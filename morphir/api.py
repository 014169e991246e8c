"""The core's public API: everything ``morphir`` exports except the defaults assembled from the
built-in morphisms and growers.

Functions here take their morphisms and growers as arguments (a :class:`Registry`, a
:class:`Grower`, or names with a registry to look them up in); ``morphir`` itself passes the
built-ins of :mod:`morphir.passes` by default. The built-in passes import this module, so the
package's imports run one way: ``morphir`` → ``morphir.passes`` → ``morphir.api`` → the core.

>>> from morphir.api import MorphGraph, Morphism, ScoredMorphism, candidates
"""

from morphir import zoo
from morphir.channel_rules import blocking, follower, passthrough
from morphir.batches import as_args, batch_size, eval_mode, mean_loss, to_device
from morphir.channel_scoring import (
    ProducerStart,
    consumer_calls,
    incoming_stack,
    producer_change,
    producer_starts,
    site_rows,
    stack_theta,
)
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
from morphir.engine import PassResult, apply, candidates, output_mismatch, rewrite
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
from morphir.config import GrowConfig
from morphir.loop import grow, resolve_grower
from morphir.results import GrowResult, retrain
from morphir.selection import count_flops, select
from morphir.train import cosine_lr, recalibrate_batch_norm, sgd, train_epoch
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
from morphir.morphism import Candidate, Morphism, Registry, Site, resolve
from morphir.contract import ContractReport, ContractViolation, check_morphism
from morphir.optim_state import carry_state, rebuild_optimizer
from morphir.redundancy import redundant_channels
from morphir.rewriter import ChannelCopy, ParamEdit, Rewriter, batch_norm_after
from morphir.scoring import (
    ScoredMorphism,
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

__all__ = [
    "analyse",
    "AnalysisError",
    "apply",
    "apply_in_turn",
    "as_args",
    "batch_loss",
    "batch_norm_after",
    "batch_size",
    "blocking",
    "Candidate",
    "candidates",
    "carry_state",
    "ChannelAnalysis",
    "ChannelCopy",
    "ChannelGroup",
    "ChannelRules",
    "check_fidelity",
    "check_morphism",
    "check_onnx",
    "check_probe",
    "CheckpointError",
    "compile",
    "Consumer",
    "consumer_calls",
    "ContractReport",
    "ContractViolation",
    "cosine_lr",
    "count_flops",
    "curvature_factors",
    "Data",
    "DataError",
    "dot_at_consumers",
    "eval_mode",
    "exact_delta_loss",
    "exact_delta_losses",
    "export_onnx",
    "export_program",
    "ExportError",
    "Fidelity",
    "find_mismatch",
    "Follower",
    "follower",
    "gn_estimate",
    "grad_dot",
    "grow",
    "GrowConfig",
    "Grower",
    "GrowResult",
    "Growth",
    "GrowthStep",
    "incoming_stack",
    "InvariantError",
    "Layout",
    "LeafPolicy",
    "line_search",
    "load_data",
    "load_model",
    "LoadError",
    "log_entry",
    "make_probe",
    "mean_loss",
    "Mismatch",
    "MorphGraph",
    "MorphirError",
    "Morphism",
    "MorphismError",
    "noise_profile",
    "output_mismatch",
    "ParamEdit",
    "PassResult",
    "passthrough",
    "PreservationError",
    "Producer",
    "producer_change",
    "producer_starts",
    "ProducerStart",
    "propagate",
    "rebuild_optimizer",
    "recalibrate_batch_norm",
    "redundant_channels",
    "Registry",
    "replay_entries",
    "resolve",
    "resolve_grower",
    "resolve_model",
    "retrain",
    "rewrite",
    "Rewriter",
    "RuleContext",
    "score",
    "ScoreConfig",
    "ScoreContext",
    "ScoredMorphism",
    "Scorer",
    "Segment",
    "select",
    "sgd",
    "Site",
    "site_rows",
    "spearman",
    "stack_theta",
    "to_device",
    "trace",
    "TraceError",
    "train_epoch",
    "TrainingError",
    "write_report",
    "zoo",
]
