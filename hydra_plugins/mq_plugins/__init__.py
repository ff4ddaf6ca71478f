"""mq's Hydra plugins. Hydra instantiates sweepers and launchers only from the ``hydra_plugins``
namespace package; pyproject.toml packages this one with mq. The code lives in ``mq``
(mq.sweep.sweeper, mq.sweep.launcher), so that compute nodes only need ``mq`` installed."""

from mq.sweep.launcher import TolerantLauncher
from mq.sweep.sweeper import Sweeper as _Sweeper
from mq.sweep.tune import TuneSweeper as _TuneSweeper


class Sweeper(_Sweeper):
    """conf/hydra/sweeper/mq.yaml"""


class TuneSweeper(_TuneSweeper):
    """conf/hydra/sweeper/tune.yaml"""


class SlurmLauncher(TolerantLauncher):
    """conf/hydra/launcher/slurm.yaml"""

    _EXECUTOR = "slurm"


class LocalLauncher(TolerantLauncher):
    """conf/hydra/launcher/local.yaml"""

    _EXECUTOR = "local"
