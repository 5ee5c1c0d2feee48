"""Root-cause diagnosis of missing (None) and zero gradients: why, and where in the user's code."""

from gradtel.diagnosis.cause import Cause, Diagnosis
from gradtel.diagnosis.diagnoser import Diagnoser

__all__ = ["Cause", "Diagnoser", "Diagnosis"]
