import sys

from imask_jax.evaluation.paper.command import main

sys.exit(main())
