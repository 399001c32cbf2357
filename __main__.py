"""``python -m shardps ...`` is the ``shardps`` command."""
from .client.cli import main

main()
