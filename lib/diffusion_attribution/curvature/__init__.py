"""K-FAC and EK-FAC of the GGN (the paper's Sec. 3.1): the curvature operators in the flat
parameter layout, the fit by forward/backward hooks (the default) and through curvlinops (the
reference), and the Kronecker algebra they share. Uses :mod:`diffusion_attribution.diffusion`
and nothing of the attribution or evaluation layers."""
