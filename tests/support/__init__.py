"""Test-data generators: synthetic CT series in every accepted transfer syntax.

They live here, not in ``lungnode``, because only the tests and ``scripts/``
use them and one of them shells out to DCMTK's ``dcmcjpeg``: neither the wheel
(``include = ["lungnode*"]``) nor the Docker image (it copies ``lungnode/``
only) ships this package.
"""
