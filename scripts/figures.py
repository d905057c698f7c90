"""matplotlib for the scripts' figures: an optional package, imported only when a figure is drawn."""

import os

from errors import UsageError
from utils import atomic_file


def pyplot():
    """matplotlib.pyplot without a display, or a one-line UsageError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            'figures need matplotlib: pip install "matplotlib>=3.7" (or pip install -e ".[plots]")'
        ) from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi: int = 100):
    """Write the figure atomically in the format its file name says (.png, .svg, .pdf), and close it."""
    with atomic_file(path) as f:
        fig.savefig(f, dpi=dpi, format=os.path.splitext(path)[1][1:].lower())
    pyplot().close(fig)
