import sys

from imask_jax.predict.command import main

sys.exit(main())
