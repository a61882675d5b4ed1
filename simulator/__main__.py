import sys

from simulator.server import main

sys.exit(main())
