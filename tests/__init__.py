# The text of a sitecustomize.py that makes `import torch` raise ImportError in a subprocess started with its folder
# on PYTHONPATH (and in the processes that inherit it: Ray's workers): the tests of torch-free paths use it.
NO_TORCH = 'import sys\nsys.modules["torch"] = None\n'
