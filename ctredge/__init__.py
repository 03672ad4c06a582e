"""ctredge: click-through-rate models from training to a production server.

The hub package holds what every stage shares (feature contract, hashing, the
click-log reader, metrics, artifacts, errors) and depends only on the standard
library and numpy.  Stages live in ``ctredge.train``, ``ctredge.compress``,
``ctredge.export``, ``ctredge.serve`` and ``ctredge.benchmarks``.
"""

__version__ = "0.1.0"
