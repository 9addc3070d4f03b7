"""Mass models: deflection angles of the singular power-law ellipsoid and external shear.

All functions are pure tensor functions: parameters are floats, 0-d tensors or (B,) tensors,
positions any shape S, and results have shape S or ``(B, *S)``.  Angles in arcsec, position angles in
radians counter-clockwise from +x.
"""
from .conventions import (coolest_angle, from_caustics_epl, from_coolest_pemd, from_coolest_shear,
                          from_lenstronomy_epl, from_lenstronomy_shear, to_caustics_epl,
                          to_coolest_pemd, to_coolest_shear, to_lenstronomy_epl,
                          to_lenstronomy_shear)
from .jacobian import critical_curves_and_caustics, deflection_jacobian, magnification
from .shear import shear_deflection
from .spl import SplTable, default_spl_table, spl_deflection

__all__ = [
    "spl_deflection", "shear_deflection", "SplTable", "default_spl_table",
    "to_lenstronomy_epl", "from_lenstronomy_epl", "to_lenstronomy_shear",
    "from_lenstronomy_shear", "to_caustics_epl", "from_caustics_epl", "coolest_angle",
    "to_coolest_pemd", "from_coolest_pemd", "to_coolest_shear", "from_coolest_shear",
    "deflection_jacobian", "magnification", "critical_curves_and_caustics",
]
