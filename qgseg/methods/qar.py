"""qar: supervised loss + lambda_qar * mean(1 - g(x_u, sigmoid(f(x_u)))).

The QAR term itself lives in the ssl task, since ``--qar-weight`` adds it to any method; this
method only has no unlabeled loss of its own (``ssl.qar_weight`` defaults to 0.01 for it).
"""
from qgseg.methods.common import Method

METHOD = Method("qar", "quality-aware regularisation: 1 - g(x_u, sigmoid(f(x_u)))", pseudolabel=False)
