"""qar: supervised loss + lambda_qar * mean(1 - g(x_u, sigmoid(f(x_u)))).

The QAR term itself lives in the ssl task, since ``--qar-weight`` adds it to any method; this
method only has no unlabeled loss of its own and brings the paper's ``ssl.qar_weight`` = 0.01.
"""
from qgseg.methods.common import Method

METHOD = Method("qar", "quality-aware regularisation: 1 - g(x_u, sigmoid(f(x_u)))", pseudolabel=False,
                qw_note="QAR is a loss of its own", defaults={"ssl.qar_weight": 0.01}, positive=("ssl.qar_weight",))
