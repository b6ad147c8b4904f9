"""The code Triton runs: the reference ensembles' Python-backend steps (channel preparation, heat maps to boxes,
weighted box fusion, 3D linking) and the generic ONNX runner. numpy, scipy and onnxruntime only: nothing of the
gateway, so the Triton image needs only this package and the model folders.

Each step's ``model.py`` in ``model_repository/<model>/1/`` imports its function from here; the gateway's
virtualenv has this package installed (``pip install -e .``), the Triton image copies it onto its
``PYTHONPATH`` (``docker/Dockerfile.triton``).
"""
