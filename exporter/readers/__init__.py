"""Checkpoint readers, one module per source format. Each has `FORMAT` (its key in `READERS`, the name
`--format` takes), `OPTIONS` (the keyword options its `load` takes: `load_checkpoint` refuses any other by
name), `detect(directory) -> bool` and `load(directory, dtype, **options) -> LoadedPolicy` (our model + a
`PolicySpec` naming its conventions); a new source is one new module here and one line in `READERS`.
Importing this package imports no reader (and so no torch).
"""

# Each reader's FORMAT -> its module; `detect` is asked in this order.
READERS = {
    "lerobot-0.6": "exporter.readers.lerobot_v06",
    "lerobot-0.4": "exporter.readers.lerobot_v04",
    "lerobot-0.3": "exporter.readers.lerobot_v03",
    "openpi": "exporter.readers.openpi_pytorch",
    "openpi-jax": "exporter.readers.openpi_jax",
}
