"""jaxce: numerically stable classification losses for JAX, with hand-written gradients."""

from jaxce import sharded as sharded  # the vocabulary-parallel namespace, jaxce.sharded
from jaxce._binary import binary_cross_entropy as binary_cross_entropy
from jaxce._binary import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from jaxce._cross_entropy import nll_loss as nll_loss
from jaxce._cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from jaxce._cross_entropy import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jaxce._focal import sigmoid_focal_loss as sigmoid_focal_loss
from jaxce._focal import softmax_focal_loss as softmax_focal_loss
from jaxce._information import entropy as entropy
from jaxce._information import kl_divergence as kl_divergence
from jaxce._information import softmax_entropy as softmax_entropy
from jaxce._labels import check_labels as check_labels
from jaxce._linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from jaxce._sigmoid import log_sigmoid as log_sigmoid
from jaxce._sigmoid import logit_soft_cap as logit_soft_cap
from jaxce._sigmoid import sigmoid as sigmoid
from jaxce._softmax import log_softmax as log_softmax
from jaxce._softmax import logsumexp as logsumexp
from jaxce._softmax import softmax as softmax

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "check_labels",
    "entropy",
    "kl_divergence",
    "linear_softmax_cross_entropy",
    "log_sigmoid",
    "log_softmax",
    "logit_soft_cap",
    "logsumexp",
    "nll_loss",
    "sigmoid",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_entropy",
    "softmax_focal_loss",
]
