"""Mutation testing of the replay oracle: ``python -m chatapp_tools.mutate``."""
