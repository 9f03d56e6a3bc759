import sys

from selfsup.launch.cli.main import main

sys.exit(main())
