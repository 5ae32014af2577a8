"""Plug-ins for RL training stacks: :mod:`kpo_rs.integrations.verl`,
:mod:`kpo_rs.integrations.trl`, :mod:`kpo_rs.integrations.skyrl`,
:mod:`kpo_rs.integrations.prime_rl` and :mod:`kpo_rs.integrations.slime`. Each imports its stack
lazily and says what to install when it is missing."""
