"""The bundle format: the manifest and the files it names, the graphs' contracts, the policy spec and its named conventions. Imports nothing else of the runtime."""
