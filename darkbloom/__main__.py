"""`python -m darkbloom`: the same as the `darkbloom` console script."""

import sys

from darkbloom.cli import main

sys.exit(main())
