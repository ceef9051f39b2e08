import sys

from modjax.cli import main

sys.exit(main())
