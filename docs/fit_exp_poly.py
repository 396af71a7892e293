"""Coefficients of the CPU kernels' float32 exp polynomial (csrc/cpu/cpu_exp.h): exp(r) ~ 1 + c1 r +
... + c5 r^5 on |r| <= ln2 / 2, minimising the largest relative error (a linear program over a
dense grid), printed as the float32 hex literals the kernel uses.

    .venv/bin/python docs/fit_exp_poly.py
"""

import numpy as np
from scipy.optimize import linprog

DEGREE = 5


def fit(degree=DEGREE, points=20001):
    r = np.linspace(-np.log(2) / 2, np.log(2) / 2, points)
    f = np.exp(r)
    # variables c_1 .. c_d and the bound e: minimise e with |(1 + sum c_i r^i - f) / f| <= e
    basis = np.stack([r**i / f for i in range(1, degree + 1)], 1)
    b = (f - 1) / f
    e = -np.ones((points, 1))
    res = linprog(np.r_[np.zeros(degree), 1.0],
                  A_ub=np.vstack([np.hstack([basis, e]), np.hstack([-basis, e])]),
                  b_ub=np.r_[b, -b], bounds=[(None, None)] * (degree + 1), method="highs")
    return res.x[:degree], res.x[degree]


if __name__ == "__main__":
    coeffs, err = fit()
    print(f"max relative error before rounding: {err:.3e}")
    for i, c in reversed(list(enumerate(coeffs, start=1))):
        mantissa, exponent = float(np.float32(c)).hex().split("p")
        print(f"c{i} = {mantissa.rstrip('0')}p{exponent}f")
