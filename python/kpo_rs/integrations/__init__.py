"""Plug-ins for RL training stacks: :mod:`kpo_rs.integrations.verl` and
:mod:`kpo_rs.integrations.trl`. Each imports its stack lazily and says what to install when it is
missing."""
