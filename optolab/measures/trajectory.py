"""The trajectory of per-example losses through training (Olsson et al. 2022's per-token loss
PCA; Hoogland et al.'s "essential dynamics" on outputs): where the model's behaviour turns.

Rules:
- Input: a run's per-example losses ``X [eval, position]`` (:mod:`optolab.training.per_example`)
  and the evals' positions in training ``xs`` (sequences).
- PCA: the columns are centred on their mean over the evals; the principal components are the
  right singular vectors of the centred matrix, the trajectory its projection on the first ``k``
  (signs fixed so each component's largest loading is positive, for stable figures), and each
  component's explained variance its squared singular value over the total.
- Another run projects onto a reference run's components and mean (:func:`project`), so a sweep's
  runs share one picture.
- Speed: the distance travelled in the first ``k`` components per sequence between consecutive
  evals. Turning: the angle between consecutive steps of the path (degrees; 0 straight on, 180
  back), the quantity Olsson's phase change shows as a sharp turn. Both are attached to the
  later eval of each step (speed) or the middle eval of each pair (turning); NaN where a step
  has zero length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Trajectory:
    xs: np.ndarray  # [eval] sequences
    path: np.ndarray  # [eval, k] projection on the components
    components: np.ndarray  # [k, position]
    mean: np.ndarray  # [position]
    explained: np.ndarray  # [k] fraction of the variance


def pca(X: np.ndarray, xs: np.ndarray, k: int = 3) -> Trajectory:
    """The trajectory of ``X [eval, position]`` on its first ``k`` principal components."""
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(0)
    centred = X - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(k, vt.shape[0])
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    comps = comps * np.where(signs == 0, 1, signs)[:, None]
    total = float((s ** 2).sum()) or 1.0
    return Trajectory(np.asarray(xs, dtype=np.float64), centred @ comps.T, comps, mean, (s[:k] ** 2) / total)


def project(X: np.ndarray, xs: np.ndarray, onto: Trajectory) -> Trajectory:
    """``X``'s trajectory on another run's components (same positions)."""
    path = (np.asarray(X, dtype=np.float64) - onto.mean) @ onto.components.T
    return Trajectory(np.asarray(xs, dtype=np.float64), path, onto.components, onto.mean, onto.explained)


def speed(t: Trajectory) -> np.ndarray:
    """``[eval - 1]``: distance per sequence between consecutive evals."""
    steps = np.diff(t.path, axis=0)
    return np.linalg.norm(steps, axis=1) / np.maximum(np.diff(t.xs), 1e-12)


def turning(t: Trajectory) -> np.ndarray:
    """``[eval - 2]``: the angle (degrees) between consecutive steps of the path."""
    steps = np.diff(t.path, axis=0)
    a, b = steps[:-1], steps[1:]
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    # Kahan's form, 2·atan2(|â − b̂|, |â + b̂|): accurate to a few ulps at every angle. The
    # arccos of a dot product is not: near 0° and 180° a rounding error of 1e-16 in the cosine
    # is an angle error of ~1e-6 degrees, which BLAS kernels differing by CPU do produce.
    with np.errstate(invalid="ignore", divide="ignore"):
        ua, ub = a / na[:, None], b / nb[:, None]
        angle = 2 * np.arctan2(np.linalg.norm(ua - ub, axis=1), np.linalg.norm(ua + ub, axis=1))
    return np.degrees(angle)
