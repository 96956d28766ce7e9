import sys

from koupleless.cli import main

sys.exit(main())
