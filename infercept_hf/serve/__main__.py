"""`python -m infercept_hf.serve`: the same as `infercept-serve`."""
from .cli import main

main()
