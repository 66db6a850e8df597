"""The paper's Tables 3-7 and Figures 6-8 from evaluated runs, one command each:

  python -m imask_jax.evaluation.paper --table 3 --run mask_rcnn=WD1 --run imask=WD2 --out DIR

`runs` reads what `python -m imask_jax.evaluate` wrote into each workdir; `segmentation`
(Tables 3, 4, 6), `thickness` (Table 5) and `raters` (Table 7, the evaluations joined on the
case id) lay the models side by side with evaluation/report's cells; `label_maps` reads one
case's truth and predictions and `figures` draws Figures 6-8; `command` is the entry point.
docs/reproducing.md maps each of the paper's tables and figures to its command."""
