"""Speculative decoding: who proposes tokens, how many each request verifies, what it cost.

The scheduler schedules a decode's ``1 + k`` rows; the runner verifies them (the target's own
token at every row, kept up to the first that differs from the draft); the scheduler rolls back
the rest. This package decides the ``k`` and supplies the proposed tokens.
"""

from convoy.engine.spec_decode.controller import DraftLengthController
from convoy.engine.spec_decode.proposers import NgramProposer, OracleProposer
from convoy.engine.spec_decode.speculator import SpecDecodeStats, Speculator

__all__ = [
    "DraftLengthController",
    "NgramProposer",
    "OracleProposer",
    "SpecDecodeStats",
    "Speculator",
]
