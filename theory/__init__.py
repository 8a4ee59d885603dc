"""Numerical checks of FSLoRA's theory (docs/method.md section 6): sketch moments, smoothness, convergence.

Each script (`python -m theory.<name>`) prints measured against predicted values with their ratio,
draws PNG figures under theory/figures/, and exits non-zero when a check fails. See README.md.
"""
