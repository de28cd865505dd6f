"""What every stage shares: typed params, errors, atomic I/O, the run environment and the stage contract."""
