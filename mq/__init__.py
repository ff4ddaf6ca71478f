"""mq: MetaQuant experiment system (Chen, Wang & Pan, NeurIPS 2019)."""

__version__ = "0.11.0"
