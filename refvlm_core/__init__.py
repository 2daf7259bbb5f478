"""REF-VLM as a library: TRP grammar, geometry, model, predictor. No ROS imports here.

Importing this package is cheap (no torch); import the submodules you need.
"""
__version__ = "0.1.0"
