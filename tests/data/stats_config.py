"""A small run config for the `python -m jaxopd.data --stats` test: the bundled corpus, short rows."""

import ml_collections

from jaxopd.data.pipeline import default_data_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = default_data_config()
    config.data.fim_rate = 0.5
    config.seq_len = 256
    config.batch_size = 4
    config.seed = 0
    return config
