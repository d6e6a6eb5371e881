"""The application layer: the ``probe`` console script (:mod:`prefix_probe.cli`).

The layers import downwards only: ``tasks`` -> ``probe`` -> ``analysis`` -> ``prefix_probe``.
"""
