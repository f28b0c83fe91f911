"""The math of gossip training as pure functions on flat tensors plus small state objects.

Averaging rules (D-PSGD, push-sum / SGP, variance-corrected averaging) work batched, on N models
stacked as ``[N, P]`` with a (sparse) mixing matrix, and per node, on one ``[P]`` buffer and the
buffers it received. Both forms go through the merge kernels of :mod:`gossip.ops`.

Compression and error control: compressors with exact wire formats (:mod:`.compression`,
``make_compressor("topk:0.01")``), error feedback for client/server methods (EF14, EF21,
EControl; :mod:`.feedback`) and compressed gossip with public copies (CHOCO-SGD, MoTEF;
:mod:`.choco`). Gradient codes: exact codes that skip the slowest workers (:mod:`.coding`) and
sequential codes across rounds under bursty stragglers (:mod:`.sgc`; its ``Task`` is not
re-exported here, to keep it apart from :class:`gossip.tasks.Task`).
"""

from .averaging import as_torch_matrix, dpsgd_step, gossip_average_, mix
from .choco import (
    ChocoEControlState,
    ChocoState,
    MoTEFState,
    PublicCopy,
    absorb_,
    choco_econtrol_gossip,
    choco_gossip,
    choco_node_consensus_,
    motef_node_model_,
    motef_node_tracker_,
    motef_step,
    publish_,
)
from .coding import (
    CyclicRepetitionCode,
    FractionalRepetitionCode,
    GradientCode,
    default_scheme,
    make_code,
)
from .compression import (
    Cast,
    Compressor,
    Identity,
    Payload,
    RandK,
    ScaledSign,
    StochasticQuantizer,
    TopK,
    make_compressor,
)
from .feedback import (
    EControlState,
    EF14State,
    EF21State,
    ServerState,
    compressed_sgd_step,
    econtrol_step,
    ef14_step,
    ef21_step,
    server_step,
)
from .pushsum import (
    PushSumState,
    push_sum_debias,
    push_sum_gradient_step_,
    push_sum_merge_,
    push_sum_mix,
    push_sum_send_shares,
)
from .sgc import (
    BurstyModel,
    GradientCodingScheme,
    MultiplexedSGC,
    ScheduleReport,
    SelectiveRepetitionSGC,
    SequentialScheme,
    bursty_pattern,
    conforms,
    first_violation,
    gc_load,
    msgc_delay,
    msgc_load,
    sr_sgc_load,
    sr_sgc_tolerance,
)
from .variance import (
    TARGETS,
    AveragingBuffer,
    rescale_to_variance_,
    variance_corrected_average,
    variance_corrected_mix,
    variance_targets,
)

__all__ = [
    # averaging
    "as_torch_matrix",
    "mix",
    "dpsgd_step",
    "gossip_average_",
    "PushSumState",
    "push_sum_mix",
    "push_sum_debias",
    "push_sum_send_shares",
    "push_sum_merge_",
    "push_sum_gradient_step_",
    "TARGETS",
    "AveragingBuffer",
    "variance_targets",
    "rescale_to_variance_",
    "variance_corrected_average",
    "variance_corrected_mix",
    # compression
    "Payload",
    "Compressor",
    "make_compressor",
    "Identity",
    "Cast",
    "TopK",
    "RandK",
    "StochasticQuantizer",
    "ScaledSign",
    # error feedback
    "ServerState",
    "server_step",
    "EF14State",
    "ef14_step",
    "EF21State",
    "ef21_step",
    "EControlState",
    "econtrol_step",
    "compressed_sgd_step",
    # public copies: CHOCO, MoTEF
    "ChocoState",
    "choco_gossip",
    "ChocoEControlState",
    "choco_econtrol_gossip",
    "MoTEFState",
    "motef_step",
    "PublicCopy",
    "publish_",
    "absorb_",
    "choco_node_consensus_",
    "motef_node_model_",
    "motef_node_tracker_",
    # gradient codes
    "GradientCode",
    "FractionalRepetitionCode",
    "CyclicRepetitionCode",
    "default_scheme",
    "make_code",
    # sequential gradient codes
    "BurstyModel",
    "bursty_pattern",
    "conforms",
    "first_violation",
    "gc_load",
    "sr_sgc_tolerance",
    "sr_sgc_load",
    "msgc_delay",
    "msgc_load",
    "SequentialScheme",
    "ScheduleReport",
    "GradientCodingScheme",
    "SelectiveRepetitionSGC",
    "MultiplexedSGC",
]
