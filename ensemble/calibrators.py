"""The calibrated mappings from stage logits to final probabilities, all swap-equivariant.

* :class:`TemperatureCalibrator` on one stage or on the plain average of stages: logits / T plus a
  tie bias (A and B share a bias of zero, so swapping stays exact). Two parameters; hard to overfit.
* :class:`WeightedAverage`: a weighted average of the stages' log-probabilities with weights on the
  simplex, then temperature and tie bias, all fitted together on OOF log loss (scipy L-BFGS).
* :class:`LogisticStacker`: multinomial logistic regression on the log-probabilities of every stage
  (optionally with the cheap meta features of :mod:`ensemble.meta`), fitted on the rows and their
  swapped copies and predicted with swap averaging, so it is exactly equivariant.

All take ``(logits, y)`` to fit and ``logits`` to predict, plus ``meta`` (the ``(n, m)`` meta
features) which only the logistic stacker with ``meta=True`` reads. ``stage_weights()`` says how
much each stage counts (shares summing to one). Every calibrator serialises to plain JSON
(``to_json``/``from_json``): no pickles.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from battles.labels import SWAP_PERMUTATION, swap_columns
from ensemble.meta import META_NAMES, META_SWAP_SIGN, swap_meta


def stage_log_probs(logits: list[np.ndarray]) -> list[np.ndarray]:
    return [log_softmax(np.asarray(x, dtype=np.float64), axis=1) for x in logits]


def _cross_entropy(z: np.ndarray, onehot: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted mean cross-entropy of logits ``z`` ``(n, 3)`` and its gradient with respect to ``z``
    (analytic gradients let L-BFGS take one pass over the rows per step instead of one per parameter)."""
    logp = log_softmax(z, axis=1)
    total = w.sum()
    loss = -float((w * (onehot * logp).sum(axis=1)).sum()) / total
    return loss, (np.exp(logp) - onehot) * (w / total)[:, None]


def _stage_swap_perm(n_stages: int) -> np.ndarray:
    """The column permutation that swaps A and B inside every stage's 3-column group."""
    return np.concatenate([3 * s + np.array(SWAP_PERMUTATION) for s in range(n_stages)])


def _swap_stack(x: np.ndarray, n_stages: int) -> np.ndarray:
    """Swap A/B columns inside every stage's 3-column group of a stacked logit matrix."""
    return x[:, _stage_swap_perm(n_stages)]


class TemperatureCalibrator:
    """softmax(mean_s(log p_s) / T + [0, 0, tie_bias]) over the chosen stages (one stage: plain temperature)."""

    kind = "temperature"

    def __init__(self, stages: list[int] | None = None):
        self.stages = stages
        self.temperature, self.tie_bias = 1.0, 0.0

    def _base(self, logits: list[np.ndarray]) -> np.ndarray:
        chosen = [logits[i] for i in (self.stages if self.stages is not None else range(len(logits)))]
        return np.mean(stage_log_probs(chosen), axis=0)

    def fit(self, logits, y, weight=None, meta=None):
        base = self._base(logits)
        onehot = np.eye(3)[y]
        w = np.ones(len(y)) if weight is None else weight

        def loss(theta):
            scaled = base / np.exp(theta[0])
            value, dz = _cross_entropy(scaled + np.array([0.0, 0.0, theta[1]]), onehot, w)
            return value, np.array([-(dz * scaled).sum(), dz[:, 2].sum()])

        # Bounded: a near-constant stage would otherwise drive T towards 0 (overflowing logits).
        res = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B",
                       bounds=[(np.log(0.02), np.log(50.0)), (-5.0, 5.0)])
        self.temperature, self.tie_bias = float(np.exp(res.x[0])), float(res.x[1])
        return self

    def predict_proba(self, logits, meta=None) -> np.ndarray:
        return softmax(self._base(logits) / self.temperature + np.array([0.0, 0.0, self.tie_bias]), axis=1)

    def stage_weights(self, n_stages: int) -> np.ndarray:
        chosen = self.stages if self.stages is not None else range(n_stages)
        w = np.zeros(n_stages)
        w[list(chosen)] = 1.0
        return w / w.sum()

    def to_json(self) -> dict:
        return {"kind": self.kind, "stages": self.stages, "temperature": self.temperature, "tie_bias": self.tie_bias}

    @classmethod
    def from_json(cls, d):
        c = cls(d["stages"])
        c.temperature, c.tie_bias = d["temperature"], d["tie_bias"]
        return c


class WeightedAverage:
    """softmax(sum_s w_s log p_s / T + [0, 0, tie_bias]) with w on the simplex, fitted jointly."""

    kind = "weighted"

    def __init__(self):
        self.weights: np.ndarray | None = None
        self.temperature, self.tie_bias = 1.0, 0.0

    @staticmethod
    def _z(logp: np.ndarray, weights, temperature, tie_bias) -> np.ndarray:
        return np.tensordot(weights, logp, axes=1) / temperature + np.array([0.0, 0.0, tie_bias])

    def fit(self, logits, y, weight=None, meta=None):
        logp = np.stack(stage_log_probs(logits))  # (stages, n, 3)
        onehot = np.eye(3)[y]
        w = np.ones(len(y)) if weight is None else weight
        n = len(logits)

        def loss(theta):
            weights, temperature = softmax(theta[:n]), np.exp(theta[n])
            z = self._z(logp, weights, temperature, theta[n + 1])
            value, dz = _cross_entropy(z, onehot, w)
            d_weights = np.tensordot(logp, dz, axes=([1, 2], [0, 1])) / temperature
            d_theta = weights * (d_weights - weights @ d_weights)  # through the softmax
            scaled = z - np.array([0.0, 0.0, theta[n + 1]])
            return value, np.concatenate([d_theta, [-(dz * scaled).sum(), dz[:, 2].sum()]])

        bounds = [(-10.0, 10.0)] * n + [(np.log(0.02), np.log(50.0)), (-5.0, 5.0)]
        res = minimize(loss, np.zeros(n + 2), jac=True, method="L-BFGS-B", bounds=bounds)
        self.weights = softmax(res.x[:n])
        self.temperature, self.tie_bias = float(np.exp(res.x[n])), float(res.x[n + 1])
        return self

    def predict_proba(self, logits, meta=None) -> np.ndarray:
        return softmax(self._z(np.stack(stage_log_probs(logits)), self.weights, self.temperature, self.tie_bias), axis=1)

    def stage_weights(self, n_stages: int) -> np.ndarray:
        return np.asarray(self.weights, dtype=np.float64)

    def to_json(self) -> dict:
        return {"kind": self.kind, "weights": [float(v) for v in self.weights], "temperature": self.temperature,
                "tie_bias": self.tie_bias}

    @classmethod
    def from_json(cls, d):
        c = cls()
        c.weights, c.temperature, c.tie_bias = np.array(d["weights"]), d["temperature"], d["tie_bias"]
        return c


def _swap_operator(perm: np.ndarray, sign: np.ndarray, k: int) -> np.ndarray:
    """The linear map T on multinomial parameters (``k`` classes x (features + intercept), flattened)
    with loss(swapped rows, theta) = loss(rows, T theta): classes a and b trade places and the
    features are permuted and sign-flipped as the swap does to them."""
    d = len(perm)
    cols, signs = np.r_[perm, d], np.r_[sign, 1.0]  # the intercept stays
    classes = np.arange(k)
    classes[:2] = SWAP_PERMUTATION[:2]
    op = np.zeros((k * (d + 1), k * (d + 1)))
    for c in range(k):
        for j in range(d + 1):
            op[classes[c] * (d + 1) + cols[j], c * (d + 1) + j] = signs[j]
    return op


def _multinomial_lr(x: np.ndarray, y: np.ndarray, w: np.ndarray, C: float, swap=None, tol: float = 1e-12,
                    max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """L2-penalised multinomial logistic regression: minimises ``sum_i w_i CE_i + |coef|^2 / (2C)`` (the
    objective of scikit-learn's ``LogisticRegression(C=C)``, intercept unpenalised) by Newton's method
    with a backtracking line search; returns (coef, intercept).

    ``swap=(perm, sign)``: fit on the rows and on their swapped copies (features ``x[:, perm] * sign``,
    labels a and b exchanged) without building the copies. The objective is then invariant under the
    swap map T of the parameters (:func:`_swap_operator`) and strictly convex in the coefficients, so
    its minimum is T-symmetric: the search runs in that subspace, where the copies' loss equals the
    rows' own, on half the rows.

    The stacker has tens of features and up to hundreds of thousands of rows: the exact Hessian is a
    small dense matrix, so a handful of Newton steps reach machine precision where a first-order
    solver needs dozens of passes over the rows. The intercepts' common shift is not identified (it
    does not change a prediction); steps are minimum-norm, so the intercepts keep summing to zero."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    k = 3
    xt = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(k)[y]
    w = np.asarray(w, dtype=np.float64)
    penalty = np.tile(np.r_[np.full(d, 1.0 / C), 0.0], k)  # diagonal of the penalty's Hessian
    if swap is None:
        basis, copies = np.eye(k * (d + 1)), 1.0
    else:  # orthonormal basis of T's fixed points; each row stands for itself and its swapped copy
        values, vectors = np.linalg.eigh(_swap_operator(*swap, k))
        basis, copies = vectors[:, values > 0], 2.0

    def objective(theta):
        logp = log_softmax(xt @ theta.reshape(k, d + 1).T, axis=1)
        return -copies * (w * (onehot * logp).sum(axis=1)).sum() + 0.5 * (penalty * theta * theta).sum(), logp

    theta = np.zeros(k * (d + 1))
    f, logp = objective(theta)
    for _ in range(max_iter):
        p = np.exp(logp)
        grad = copies * ((w[:, None] * (p - onehot)).T @ xt).ravel() + penalty * theta
        hess = np.empty((k * (d + 1), k * (d + 1)))
        for a in range(k):
            for b in range(a, k):
                block = (xt * (w * p[:, a] * (float(a == b) - p[:, b]))[:, None]).T @ xt
                hess[a * (d + 1):(a + 1) * (d + 1), b * (d + 1):(b + 1) * (d + 1)] = block
                hess[b * (d + 1):(b + 1) * (d + 1), a * (d + 1):(a + 1) * (d + 1)] = block.T
        hess *= copies
        hess[np.diag_indices_from(hess)] += penalty
        grad, hess = basis.T @ grad, basis.T @ hess @ basis
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        decrement = float(grad @ step)  # Newton decrement squared: predicted halving of the gap
        step = basis @ step
        if decrement <= tol * max(1.0, abs(f)):
            break
        t = 1.0
        while True:
            f_new, logp_new = objective(theta - t * step)
            if f_new <= f - 1e-4 * t * decrement or t < 1e-8:
                break
            t *= 0.5
        theta, f, logp = theta - t * step, f_new, logp_new
    theta = theta.reshape(k, d + 1)
    return theta[:, :d], theta[:, d]


class LogisticStacker:
    """Multinomial logistic regression on all stages' log-probabilities (and, with ``meta=True``, the
    standardised meta features), fitted on both A/B orders and predicted with swap averaging."""

    kind = "logistic"

    def __init__(self, C: float = 1.0, meta: bool = False):
        self.C, self.meta = C, meta
        self.coef_ = self.intercept_ = None
        self.meta_mean = self.meta_scale = None

    def _features(self, logits, meta):
        """Feature matrices of the battles as given and of the swapped battles."""
        x = np.hstack(stage_log_probs(logits))
        xs = _swap_stack(x, len(logits))
        if self.meta:
            if meta is None:
                raise ValueError("this stacker was fitted with meta features: pass meta=meta_features(battles)")
            m, ms = np.asarray(meta, dtype=np.float64), swap_meta(meta)
            if self.meta_mean is None:  # fitting: standardise over both orders (sign-flipping features get mean 0)
                both = np.vstack([m, ms])
                self.meta_mean, self.meta_scale = both.mean(axis=0), np.maximum(both.std(axis=0), 1e-9)
            x = np.hstack([x, (m - self.meta_mean) / self.meta_scale])
            xs = np.hstack([xs, (ms - self.meta_mean) / self.meta_scale])
        return x, xs

    def _swap_map(self, n_stages: int) -> tuple[np.ndarray, np.ndarray]:
        """``(perm, sign)`` with swapped features = ``x[:, perm] * sign``."""
        perm = _stage_swap_perm(n_stages)
        sign = np.ones(len(perm))
        if self.meta:
            perm = np.r_[perm, len(perm) + np.arange(len(META_SWAP_SIGN))]
            sign = np.r_[sign, META_SWAP_SIGN]
        return perm, sign

    def fit(self, logits, y, weight=None, meta=None):
        self.meta_mean = self.meta_scale = None
        x, xs = self._features(logits, meta)
        w = np.ones(len(y)) if weight is None else weight
        perm, sign = self._swap_map(len(logits))
        if not np.allclose(xs, x[:, perm] * sign, rtol=0.0, atol=1e-9):
            raise AssertionError("swapped stacker features are not the swap map of the features")
        self.coef_, self.intercept_ = _multinomial_lr(x, y, w, self.C, swap=(perm, sign))
        return self

    def _log_proba(self, x):
        return log_softmax(x @ self.coef_.T + self.intercept_, axis=1)

    def predict_proba(self, logits, meta=None) -> np.ndarray:
        x, xs = self._features(logits, meta)
        return softmax(0.5 * (self._log_proba(x) + swap_columns(self._log_proba(xs))), axis=1)

    def stage_weights(self, n_stages: int) -> np.ndarray:
        """Share of the absolute coefficients on each stage's three log-probabilities (meta excluded)."""
        per_stage = np.array([np.abs(self.coef_[:, 3 * s:3 * s + 3]).sum() for s in range(n_stages)])
        return per_stage / max(per_stage.sum(), 1e-12)

    def to_json(self) -> dict:
        d = {"kind": self.kind, "C": self.C, "coef": self.coef_.tolist(), "intercept": self.intercept_.tolist(),
             "meta": self.meta}
        if self.meta:
            d.update(meta_names=META_NAMES, meta_mean=self.meta_mean.tolist(), meta_scale=self.meta_scale.tolist())
        return d

    @classmethod
    def from_json(cls, d):
        c = cls(d["C"], d.get("meta", False))
        c.coef_, c.intercept_ = np.array(d["coef"]), np.array(d["intercept"])
        if c.meta:
            if d["meta_names"] != META_NAMES:
                raise ValueError(f"stacker was fitted with meta features {d['meta_names']}, this code makes {META_NAMES}")
            c.meta_mean, c.meta_scale = np.array(d["meta_mean"]), np.array(d["meta_scale"])
        return c


CALIBRATORS = {"temperature": TemperatureCalibrator, "weighted": WeightedAverage, "logistic": LogisticStacker}


def calibrator_from_json(d: dict):
    return CALIBRATORS[d["kind"]].from_json(d)
