"""shardps.client: the SDK (``LocalCluster``) and the ``shardps`` command line."""
