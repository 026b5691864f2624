import sys

from obd.cli import main

sys.exit(main())
