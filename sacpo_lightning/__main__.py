import sys

from sacpo_lightning.cli import main

sys.exit(main())
