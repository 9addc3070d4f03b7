"""Light in the source plane: analytic Sersic profiles and pixel stamps (eq. 17).

Source objects (:class:`Sersic`, :class:`PixelSource`, :class:`SourceSum`) bundle parameters
for the simulator; the functions :func:`sersic` and :func:`image_source` evaluate the same profiles directly.
"""
from .image import image_source
from .models import PixelSource, Sersic, SourceSum
from .sersic import sersic, sersic_b

__all__ = ["sersic", "sersic_b", "image_source", "Sersic", "PixelSource", "SourceSum"]
