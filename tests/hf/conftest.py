"""Hugging Face tests: puts this folder on sys.path for ``hf_helpers``."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
