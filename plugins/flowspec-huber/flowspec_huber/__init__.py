"""flowspec-huber: an example flowspec plugin (docs/plugins.md).

Registers, through entry points in its pyproject.toml:

* objective ``lagrangian_huber``: Lagrangian distillation with a pseudo-Huber residual penalty;
* interpolant ``power``: alpha_t = 1 - t^p, beta_t = t^p;
* metric ``moments``: distance between the samples' and the data's mean and covariance.
"""

from flowspec_huber.interpolant import Power
from flowspec_huber.metric import MomentError
from flowspec_huber.objective import HuberLagrangian

__version__ = "0.1.0"
__all__ = ["HuberLagrangian", "MomentError", "Power"]
