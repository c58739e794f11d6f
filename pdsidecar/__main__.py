import sys

from pdsidecar.cli import main

sys.exit(main())
