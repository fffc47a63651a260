"""vlsi.common: the foundations every package may import, with no project dependencies.

- :mod:`vlsi.common.errors`: the one root of user-facing errors (``VlsiError``);
- :mod:`vlsi.common.config`: config dataclass fields (``opt``), option groups shared by the commands, building a
  config from defaults < file < command line, resume-critical fields;
- :mod:`vlsi.common.cli`: click options generated from config dataclasses, the ``user_errors`` wrapper every
  command uses, ``key=value`` option parsing.

Nothing here imports torch, transformers or zarr, so every command's ``--help`` stays instant.
"""
