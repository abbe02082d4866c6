"""Checkpoint readers, one module per source format. Each has `NAME`, `detect(directory) -> bool` and
`load(directory, dtype, **options) -> LoadedPolicy` (our model + a `PolicySpec` naming its conventions);
a new source is one new module here and one line in `exporter.checkpoint.READERS`.
"""
