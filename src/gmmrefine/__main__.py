import sys

from gmmrefine.cli.main import main

sys.exit(main())
