"""The ``selfsup`` command (``main.py``) and one module per subcommand (``shards``, ``views``,
``pretrain``, ``eval``, ``export``); ``python -m selfsup.launch.cli`` is the same command."""
