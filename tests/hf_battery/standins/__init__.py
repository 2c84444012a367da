"""Stand-ins for the three modules transformers' common tests import but its sdist does not ship.

They live in transformers' git repository only, which is not reachable when tests run (only package
registries are). Each is written by us and holds only what the sdist's files import from it.
"""
