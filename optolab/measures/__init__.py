"""Progress measures: attention scores, Olsson probes, composition, and the evaluator."""

from optolab.measures.attention import induction_strength, prefix_matching, previous_token
from optolab.measures.composition import composition_scores
from optolab.measures.evaluate import EvalSet, evaluate
from optolab.measures.probes import copying_scores, repeat_probe

__all__ = ["EvalSet", "composition_scores", "copying_scores", "evaluate", "induction_strength",
           "prefix_matching", "previous_token", "repeat_probe"]
