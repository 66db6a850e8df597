"""Tissue -> signal tables of the knee phantom's contrasts: the training DESS and held-out ones.

The knee generator renders every tissue from one table (scanner units per tissue name, the
keys of `mri.DESS`). 'dess' is that table, the one every training dataset uses. The held-out
contrasts are for judging a model on a contrast it was never trained on (never for training
or tuning); their tables come from the spin-echo signal equation

  S = PD (1 - exp(-TR / T1)) exp(-TE / T2)

with 3 T relaxation times of knee tissues (sources and what could be checked against them:
docs/phantoms.md, "Contrasts") and relative proton densities from water content (an
approximation), scaled so that the brightest tissue reads BRIGHTEST scanner units (DESS's
fluid: 900):

  iw_fs  intermediate-weighted turbo spin echo with fat suppression, OAI's sagittal IW TSE FS
         (TR 3200 ms, TE 30 ms; Peterfy et al., Osteoarthritis Cartilage 2008;16:1433-41):
         fluid bright, cartilage intermediate above muscle, fat and fatty marrow dark
         (spectral fat saturation leaves FAT_SUPPRESSION of their signal);
  t1     T1-weighted spin echo (TR 600 ms, TE 15 ms): fat and fatty marrow brightest,
         cartilage intermediate, fluid darker than muscle: the contrast farthest from DESS.

Spin echoes show flowing blood as a flow void (DESS, a gradient echo, shows inflow: bright)
and cortical bone has no signal in any of them.
"""

from __future__ import annotations

import math

from data_pipelines.phantoms import mri

CONTRASTS = ('dess', 'iw_fs', 't1')
# What the truth sidecar's 'sequence' says for each.
SEQUENCE_NAMES = {'dess': 'DESS-like', 'iw_fs': 'IW-TSE-FS-like', 't1': 'T1-SE-like'}

# Tissue: (T1 ms, T2 ms, relative proton density) at 3 T, each figure's source in
# docs/phantoms.md ("Contrasts"): the T2 of cartilage, muscle and marrow from published 3 T
# measurements that could be read; the T1s and the fluid's T2 as attributed to Gold et al. 2004,
# whose table could not be read (unverified). Subcutaneous fat takes fatty marrow's times (both
# are mostly fat); skin takes muscle's; menisci, tendons ("fibrous") and ligaments have T2 of
# about 10-15 ms, so they are dark in every sequence here whatever their T1.
RELAXATION_3T = {
  'fluid': (3620.0, 767.0, 1.0),
  'cartilage': (1240.0, 36.4, 0.75),
  'muscle': (1420.0, 34.1, 0.75),
  'marrow': (371.0, 124.0, 0.9),
  'fat': (371.0, 124.0, 0.9),
  'skin': (1420.0, 31.7, 0.7),
  'fibrous': (1000.0, 10.0, 0.6),
  'ligament': (1000.0, 15.0, 0.6),
}
SPIN_ECHO = {
  'iw_fs': dict(tr_ms=3200.0, te_ms=30.0, fat_suppressed=True),
  't1': dict(tr_ms=600.0, te_ms=15.0, fat_suppressed=False),
}
FAT_SUPPRESSION = 0.12  # share of fat signal a spectral fat saturation leaves
BRIGHTEST = 900.0  # scanner units of the brightest tissue
CORTEX = 15.0  # no MR signal: the noise floor, as in mri.STIR
FLOW_VOID = 60.0  # flowing blood in a spin echo


def spin_echo_signal(t1_ms: float, t2_ms: float, pd: float, tr_ms: float, te_ms: float) -> float:
  """Relative signal of a spin echo (no units): PD (1 - exp(-TR / T1)) exp(-TE / T2)."""
  return pd * (1.0 - math.exp(-tr_ms / t1_ms)) * math.exp(-te_ms / t2_ms)


def signal_table(name: str) -> dict[str, float]:
  """The tissue -> scanner units table of contrast `name` (one of CONTRASTS), with the keys of
  `mri.DESS`; 'dess' returns `mri.DESS` itself. ValueError naming the choices otherwise."""
  if name not in CONTRASTS:
    raise ValueError(f'generate_knee: contrast={name!r}; expected one of {list(CONTRASTS)}')
  if name == 'dess':
    return mri.DESS
  seq = SPIN_ECHO[name]
  relative = {
    tissue: spin_echo_signal(t1, t2, pd, seq['tr_ms'], seq['te_ms'])
    for tissue, (t1, t2, pd) in RELAXATION_3T.items()
  }
  if seq['fat_suppressed']:
    for tissue in ('fat', 'marrow'):
      relative[tissue] *= FAT_SUPPRESSION
  scale = BRIGHTEST / max(relative.values())
  table = {tissue: round(value * scale, 1) for tissue, value in relative.items()}
  table.update(cortex=CORTEX, vessel=FLOW_VOID)
  return {tissue: table[tissue] for tissue in mri.DESS}
