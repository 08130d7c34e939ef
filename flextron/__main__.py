import sys

from flextron.cli import main

sys.exit(main())
