"""The weakly-supervised demo on real anatomy (``python -m tonno_fast.demo [--quick]``).

See :mod:`tonno_fast.demo.run` for what it does and :mod:`tonno_fast.demo.data` for the subjects.
"""
from .data import Subject, Template, load_template, make_population, make_subject
from .model import SliceCNN, make_encoder
from .run import FULL, QUICK, DemoConfig, main, run_demo

__all__ = ["run_demo", "main", "DemoConfig", "FULL", "QUICK", "load_template", "make_subject",
           "make_population", "Subject", "Template", "SliceCNN", "make_encoder"]
