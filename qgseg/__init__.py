"""qgseg: quality-guided semi-supervised learning for binary 2-D medical image segmentation."""
import os as _os

# albumentations otherwise checks PyPI for updates on import.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
