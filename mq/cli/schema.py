"""Types of every config key: dataclass schemas that conf/'s YAML files extend through their
defaults lists (``- /schema/<group>/<kind>@_here_``), so that Hydra checks and converts each
value while it composes the config (``lr_decay=no`` is False, ``lr_decay=maybe`` is refused).
The YAML files keep the defaults and their comments (``--help`` reads them); a schema field is
MISSING so that it never overrides a value set earlier in the defaults list.

Hydra lets ``+key=value`` add and ``~key`` remove keys even in a typed node: :func:`check_keys`
refuses both before anything is written. A schema with ``OPEN = True`` takes keys it does not
name (torch's optimizers have more arguments than conf/ sets, and check their own).
Free of torch: Hydra's plugin scan imports mq.cli.conf, which registers these.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from mq.core.errors import ConfigError, removed_key_line, unknown_key_line

# Optional[...] rather than `X | None`: OmegaConf reads the annotations at runtime.
# ruff: noqa: UP045


@dataclass
class Task:
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class TrainTask(Task):
    from_pretrained: bool = MISSING


@dataclass
class Distributed:
    backend: str = MISSING
    timeout_s: float = MISSING


@dataclass
class Config:
    """conf/config.yaml's own keys; the groups' nodes are typed by their options' schemas."""

    bits: int = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    act_bits: int = MISSING
    lr_step: int = MISSING
    device: str = MISSING
    cudnn_benchmark: bool = MISSING
    limit_train_batches: Optional[int] = MISSING
    limit_test_batches: Optional[int] = MISSING
    log_every: int = MISSING
    checkpoint_every_min: float = MISSING
    progress: bool = MISSING
    sync_bn: bool = MISSING
    distributed: Distributed = field(default_factory=Distributed)
    keep_training_state: bool = MISSING
    checkpoints_dir: str = MISSING
    run_name: str = MISSING
    sweep_name: Optional[str] = MISSING
    model: Any = MISSING
    dataset: Any = MISSING
    quant: Any = MISSING
    act: Any = MISSING
    meta: Any = MISSING
    optimizer: Any = MISSING
    logger: Any = MISSING
    task: Any = MISSING


@dataclass
class NoTarget:
    """quant=none, logger=none: nothing to build."""

    _target_: Optional[str] = MISSING


@dataclass
class Model:
    _target_: str = MISSING
    name: str = MISSING
    num_classes: int = MISSING
    pretrained: Optional[str] = MISSING


@dataclass
class CifarResNetModel(Model):
    depth: int = MISSING


@dataclass
class Dataset:
    _target_: str = MISSING
    num_classes: int = MISSING
    val_size: int = MISSING  # conf/config.yaml's validation split, merged into every dataset
    split_seed: int = MISSING


@dataclass
class CifarDataset(Dataset):
    name: str = MISSING
    root: str = MISSING
    download: bool = MISSING


@dataclass
class FolderDataset(Dataset):
    root: str = MISSING
    cache: Optional[str] = MISSING


@dataclass
class FakeDataset(Dataset):
    num_train: int = MISSING
    num_test: int = MISSING


@dataclass
class ImageNetDataset(Dataset):
    root: str = MISSING
    workers: int = MISSING
    decode: str = MISSING


@dataclass
class Quantizer:
    _target_: str = MISSING
    bit_width: int = MISSING
    ste_slope: str = MISSING
    calibration: str = MISSING


@dataclass
class BWNQuantizer(Quantizer):
    per_filter: bool = MISSING


@dataclass
class ActQuantizer:
    _target_: str = MISSING
    bit_width: int = MISSING


@dataclass
class PACTQuantizer(ActQuantizer):
    alpha_init: float = MISSING
    alpha_decay: float = MISSING


@dataclass
class STE:
    _target_: str = MISSING


@dataclass
class MetaQuant:
    _target_: str = MISSING
    lr: float = MISSING
    lr_decay: bool = MISSING
    update: str = MISSING
    net: Any = MISSING  # typed by the net's own schema (FCNet, LSTMNet)


@dataclass
class FCNet:
    _target_: str = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    nonlinearity: str = MISSING


@dataclass
class LSTMNet:
    _target_: str = MISSING
    hidden_size: int = MISSING
    nonlinearity: str = MISSING
    state_dtype: str = MISSING
    compile: bool = MISSING


@dataclass
class Optimizer:
    OPEN: ClassVar[bool] = True  # any other argument of the torch optimizer, checked by it
    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: float = MISSING


@dataclass
class DecayOptimizer(Optimizer):
    weight_decay: float = MISSING


@dataclass
class MomentumOptimizer(DecayOptimizer):
    momentum: float = MISSING


@dataclass
class Wandb:
    _target_: Optional[str] = MISSING  # task=eval sets null: no logger
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: str = MISSING
    group: Optional[str] = MISSING
    job_type: Optional[str] = MISSING
    tags: list[str] = MISSING
    init_timeout: float = MISSING


# ConfigStore name -> schema; conf/ names them as /schema/<name>@<package> in defaults lists.
SCHEMAS: dict[str, type] = {
    "config": Config,
    "task/task": Task,
    "task/train": TrainTask,
    "none": NoTarget,
    "model/model": Model,
    "model/cifar_resnet": CifarResNetModel,
    "dataset/cifar": CifarDataset,
    "dataset/folder": FolderDataset,
    "dataset/fake": FakeDataset,
    "dataset/imagenet": ImageNetDataset,
    "quant/quantizer": Quantizer,
    "quant/bwn": BWNQuantizer,
    "act/quantizer": ActQuantizer,
    "act/pact": PACTQuantizer,
    "meta/ste": STE,
    "meta/metaquant": MetaQuant,
    "meta/net/fc": FCNet,
    "meta/net/lstm": LSTMNet,
    "optimizer/sgd": Optimizer,
    "optimizer/adam": DecayOptimizer,
    "optimizer/sgdm": MomentumOptimizer,
    "logger/wandb": Wandb,
}


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore under ``schema/`` (not a group of conf/: they
    are no options of ``meta=``, ``glob(*)`` or --help). Called with the resolvers."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        group, _, leaf = f"schema/{name}".rpartition("/")
        store.store(group=group, name=leaf, node=schema)


def _schema(node: DictConfig) -> type | None:
    kind = OmegaConf.get_type(node)  # ours only: Hydra's own nodes are Hydra's business
    return kind if dataclasses.is_dataclass(kind) and kind.__module__ == __name__ else None


def check_keys(cfg: DictConfig, prefix: str = "", schema: type | None = None) -> None:
    """Every key of ``cfg`` is one its schema names, and none was removed: refuses what
    ``+key=value`` added and what ``~key`` deleted, with the key and what is allowed."""
    schema = schema or _schema(cfg)
    if schema is not None:
        names = [f.name for f in dataclasses.fields(schema)]
        for key in cfg:
            own = str(key) in names or (not prefix and key == "hydra")  # Hydra's own node
            if not own and not getattr(schema, "OPEN", False):
                raise ConfigError(unknown_key_line(f"{prefix}{key}", names, prefix))
        for name in names:
            if name not in cfg:
                raise ConfigError(removed_key_line(f"{prefix}{name}"))
    for key in cfg:
        if not prefix and key == "hydra":
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_keys(child, f"{prefix}{key}.")


def check_config(cfg: DictConfig) -> None:
    """The composed run config: its keys match the schemas and every interpolation resolves
    to a value of its key's type; else a one-line ConfigError. ``hydra`` is Hydra's."""
    from omegaconf.errors import OmegaConfBaseException

    check_keys(cfg, schema=_schema(cfg) or Config)
    try:
        OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
        )
    except OmegaConfBaseException as exc:
        key, written = _source(cfg, str(getattr(exc, "full_key", "") or ""))
        reason = str(getattr(exc, "msg", "") or exc).strip().splitlines()[0]
        reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", reason)
        reason = re.sub(r"^While dereferencing interpolation '.*?': ", "", reason)
        raise ConfigError(f"{key}={written} cannot be resolved: {reason}") from None


def _source(cfg: DictConfig, key: str) -> tuple[str, str]:
    """``key`` and its written value; for a plain reference (``quant.bit_width=${bits}``) the
    key it refers to, whose own value is what failed."""
    written = _written(cfg, key)
    while (ref := re.fullmatch(r"\$\{([\w.]+)\}", written)) and _written(cfg, ref[1]) != "?":
        key, written = ref[1], _written(cfg, ref[1])
    return key, written


def _written(cfg: DictConfig, key: str) -> str:
    """The value of ``key`` as written (an interpolation unresolved), or ``?``."""
    node: Any = cfg
    for part in key.replace("[", ".").replace("]", "").split("."):
        if not part or node is None:
            return "?"
        try:
            node = node._get_node(int(part) if part.isdigit() else part)
        except Exception:
            return "?"
    return "?" if node is None else str(node._value())
