"""DDPMs (Ho et al. 2020; the paper's Sec. 2.1 and App. G): the data sets, the U-Net, the noise
schedule with q, the loss and ancestral sampling with trajectories, training, the
measurements m(theta, x) that are attributed (Sec. 3.3), the (t, eps) draws and per-example
gradients. Built on :mod:`diffusion_attribution.core` only."""
