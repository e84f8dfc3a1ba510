"""What every layer shares: the typed config loader, devices and precision.

``core`` imports nothing of the project; ``model/``, ``stages/``, ``trainer/``, ``synth/`` and
``pipeline/`` all may import it.
"""
