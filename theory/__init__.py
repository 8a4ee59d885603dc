"""Numerical checks of FSLoRA's theory (FSLORA.md section 5): sketch moments, smoothness, convergence.

Each script (`python -m theory.<name>`) prints measured against predicted values with their ratio,
draws PNG figures under theory/figures/, and exits non-zero when a check fails. See README.md.
"""
