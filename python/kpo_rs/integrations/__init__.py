"""Plug-ins for RL training stacks: :mod:`kpo_rs.integrations.verl`,
:mod:`kpo_rs.integrations.trl`, :mod:`kpo_rs.integrations.skyrl` and
:mod:`kpo_rs.integrations.prime_rl`. Each imports its stack lazily and says what to install when
it is missing."""
