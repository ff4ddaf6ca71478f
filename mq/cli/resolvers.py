"""Reading conf/ as Hydra does: the resolvers and schemas conf/ needs (registered by the programs
that compose it, never as a side effect of an import), and :func:`compose` for programs outside a
Hydra app. Free of torch (Hydra's plugin scan imports the launcher, which registers them)."""

from __future__ import annotations

from typing import Any

from mq.cli.conf import CONF, exclude_keys


def act_tag(act: str, act_bits: Any) -> str:
    """The part of run_name that says how activations are quantized: ``-a2-lsq``; empty for
    act=none, so that every run folder named before the act group keeps its name."""
    return "" if act == "none" else f"-a{act_bits}-{act}"


def register_resolvers() -> None:
    """The resolvers conf/ uses: ``${mq.subdir:}`` (sweep folder names), ``${mq.exclude_keys:}``
    (the keys left out of them), ``${mq_checkpoint_tag:}`` (eval folders), ``${mq.act_tag:}``
    (run_name's activation part) and ``${mq.help:}`` (--help), and the schemas that type
    conf/'s keys (mq.cli.schema). Registered by the programs that compose conf/ (launch.py
    before Hydra starts, each submitit job, mq.bench, the tests), never as a side effect of an
    import."""
    from omegaconf import OmegaConf

    from mq.cli import dirname, helptext, schema

    resolvers = {
        dirname.RESOLVER: dirname.resolve,
        "mq.exclude_keys": exclude_keys,
        "mq_checkpoint_tag": dirname.checkpoint_tag,
        "mq.act_tag": act_tag,
        helptext.RESOLVER: helptext.text,
    }
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
    schema.register_schemas()


def compose(overrides: list[str]) -> Any:
    """The run config ``python launch.py OVERRIDES`` would get, without the ``hydra`` node, for
    programs outside a Hydra app (mq.tools.bench); ``${hydra:...}`` keys are left unresolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)
