"""One module per claim; see :mod:`batchnorm.experiments`."""
