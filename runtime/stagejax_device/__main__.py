import sys

from stagejax_device.cli import main

sys.exit(main())
