"""`python -m bench`: run the benchmark (bench.run holds it, so that client processes can import it)."""

from bench.run import main

main()
