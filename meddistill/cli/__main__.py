import sys

from meddistill.cli import main

sys.exit(main())
