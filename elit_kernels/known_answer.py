"""The first-use known-answer checks at their 0.1 import path (``elit_kernels.known_answer``, as the README
documented ``verify_backend``); they live in ``elit_kernels.attention.known_answer``."""
from .attention.known_answer import (MODES, clear_verdicts, known_answer_checks, set_known_answer_checks, verdicts,
                                     verify_backend)

__all__ = ["MODES", "clear_verdicts", "known_answer_checks", "set_known_answer_checks", "verdicts", "verify_backend"]
