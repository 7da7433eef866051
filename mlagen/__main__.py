import sys

from mlagen.cli import main

sys.exit(main())
