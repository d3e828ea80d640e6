"""sup: supervised training on the labeled images only (no unlabeled term, nothing for g)."""
from qgseg.methods.common import Method

METHOD = Method("sup", "supervised baseline: labeled images only", pseudolabel=False, label="Supervised")
