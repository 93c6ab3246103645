"""`python -m darkbloom`: the same as the `darkbloom` console script."""

from darkbloom.cli import console

console()
